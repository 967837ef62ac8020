"""What one trial runs, decided once (`TrialSettings`): the method with its options validated and
checked against the loaded model family, the training settings merged from the config's layers,
and where it computes (device and the encoder's autocast dtype, `Placement`).

A trial builds its settings before anything trains (`Workspace.settings`) and hands them down:
training, the frozen features, evaluation and the saved adapter's metadata read them, nothing
below resolves a device or a precision again. A saved adapter gives its settings back
(`TrialSettings.saved`), so `evaluate` and `predict` run it as it trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpo_peft.core.config import StudyConfig, TrainConfig
from hpo_peft.core.runtime import Placement
from hpo_peft.methods import MethodConfig, get_method, method_config
from hpo_peft.models.base import ModuleNames


def merged_train(config: StudyConfig, method: str, **values: Any) -> TrainConfig:
    """`train`, then the method's paper defaults and `method_train.<method>`, then `values` (e.g.
    drawn ones); `augment` none for a method on frozen features (black-box adapters, zero-shot): they
    never see an image, so their runs record none."""
    train = config.train_for(method, **values)
    return train if get_method(method).trains_encoder else train.model_copy(update={"augment": "none"})


@dataclass(frozen=True)
class TrialSettings:
    method: str
    options: MethodConfig
    train: TrainConfig
    placement: Placement

    @classmethod
    def resolve(cls, method: str, options: dict[str, Any] | None, train: TrainConfig,
                names: ModuleNames | None = None) -> "TrialSettings":
        """Options validated (UserError naming `methods.<method>.<key>`) and, given the loaded
        family's module names, refused in one line where the family cannot run them."""
        checked = method_config(method, options)
        if names is not None:
            get_method(method).check_family(checked, names)
        return cls(method, checked, train, Placement.of(train.device, train.precision))

    @classmethod
    def saved(cls, metadata: dict[str, Any], device: str = "auto", precision: str | None = None) -> "TrialSettings":
        """A saved adapter's settings, as its metadata records them (`adapter_metadata`), run on
        `device` (where it is used now) in `precision` (default: the one it trained in; fp32 where
        the adapter predates the record)."""
        recorded = metadata.get("train", {})
        train = TrainConfig.model_validate({key: value for key, value in recorded.items() if key in TrainConfig.model_fields}
                                           | {"device": device, "precision": precision or recorded.get("precision", "fp32")})
        method = metadata["method"]
        return cls(method["name"], method_config(method["name"], method["config"]), train,
                   Placement.of(train.device, train.precision))
