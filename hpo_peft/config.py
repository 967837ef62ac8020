"""Typed study configuration, as `studies/*.yaml` writes it (config_file.py reads the file).

Every check of a bad key, type or range lives here, so a typo fails before any model is loaded.
Method-specific options stay plain dicts here and are checked by the method registry, which owns
each method's config class (this module must not import torch).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

COURSE_TEMPLATES = [
    "a histopathology slide showing [CLS]",
    "histopathology image of [CLS]",
    "pathology tissue showing [CLS]",
    "presence of [CLS] tissue on image",
]
COURSE_DESCRIPTIONS = {
    "NC": ["benign glands"],
    "G3": ["atrophic dense glands"],
    "G4": ["cribriform ill-formed fused papillary patterns"],
    "G5": ["isolated nest cells without lumen roseting patterns"],
}


def describe_validation_errors(error: ValidationError, prefix: str = "") -> list[str]:
    """One `dotted.key: message` per problem, the key prefixed with `prefix` (e.g. `methods.lora`)."""
    lines = []
    for item in error.errors():
        parts = [prefix] if prefix else []
        parts += [str(p) for p in item["loc"] if not str(p).startswith(("function-", "tagged-union"))]
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        key = ".".join(parts)
        lines.append(f"{key}: {message}" if key else message)
    return lines


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    root: Path
    images_dir: str = "images"
    train_table: str = "partition/Test/Train.xlsx"
    test_table: str = "partition/Test/Test.xlsx"
    image_column: str = "image_name"
    categories: list[str] = Field(default_factory=lambda: ["NC", "G3", "G4", "G5"], min_length=2)
    shots: int = Field(16, ge=1)
    # how trials are validated, within the label budget (see validation.py): `holdout` draws
    # val_shots more images per class (budget shots + val_shots); `kfold` validates inside the
    # shots, in `folds` folds (default 4, or shots when fewer; budget shots)
    validation: Literal["holdout", "kfold"] = "holdout"
    val_shots: int = Field(16, ge=1)
    folds: int | None = Field(None, ge=2)
    refit: bool = False  # holdout only: train the kept adapter again on shots + val_shots for its best epoch
    # which images a seed draws (data.sample_few_shot): `package`, numpy's generator per class; `course`,
    # the course notebook's order, so a study's shots are the notebook's for the same seed and K
    sampler: Literal["package", "course"] = "package"
    seed: int = 1
    # an image in both the training and the test table is refused before anything trains, unless
    # this is set (data.check_overlap); not part of a study's identity (identity.py)
    allow_overlap: bool = False

    @property
    def drawn_val_shots(self) -> int:
        """Validation images drawn beside the shots: none when validating inside them."""
        return self.val_shots if self.validation == "holdout" else 0

    @property
    def labels_per_class(self) -> int:
        return self.shots + self.drawn_val_shots

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"categories must be unique, got {value}")
        return value

    @model_validator(mode="after")
    def _validation_fits(self) -> "DataConfig":
        if self.validation == "kfold" and self.folds is not None and self.folds > self.shots:
            raise ValueError(f"folds: {self.folds} folds need at least {self.folds} shots per class, got {self.shots}")
        if self.validation == "kfold" and self.refit:
            raise ValueError("refit: kfold always refits the kept adapter on all its shots; `refit` is for holdout, remove it")
        return self

    @property
    def n_folds(self) -> int:
        """kfold: the folds used (default 4, or the shots when fewer; 1 means nothing can be held out)."""
        return min(self.folds or 4, self.shots)

    @property
    def selects(self) -> bool:
        """Whether trials can be validated and chosen between: not with kfold on one shot per class."""
        return self.validation == "holdout" or self.n_folds >= 2


class ModelConfig(Strict):
    name_or_path: str = "vinid/plip"
    revision: str | None = None
    family: Literal["hf_clip", "open_clip", "conch"] | None = None  # None: inferred from name_or_path (models/)


class PromptConfig(Strict):
    templates: list[str] = Field(default_factory=lambda: list(COURSE_TEMPLATES), min_length=1)
    descriptions: dict[str, list[str]] = Field(default_factory=lambda: dict(COURSE_DESCRIPTIONS))

    @field_validator("templates")
    @classmethod
    def _has_placeholder(cls, value: list[str]) -> list[str]:
        for template in value:
            if "[CLS]" not in template:
                raise ValueError(f"template {template!r} has no [CLS] placeholder")
        return value


DEVICE_FORMATS = "auto, cpu, cuda, cuda:N, mps, xpu, xpu:N"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:[0-9]+)?")


class TrainConfig(Strict):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(20, ge=1)
    patience: int | None = Field(5, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    eval_batch_size: int = Field(256, ge=1)
    # dihedral: each training image in one of the square's 8 symmetries (flips, quarter turns), drawn
    # per image and batch; a tissue patch has no up or left. Only where the encoder sees the images.
    augment: Literal["none", "dihedral"] = "none"

    @field_validator("device")
    @classmethod
    def _device_format(cls, value: str) -> str:
        # the format only: whether the machine has such a device is checked where it is used
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"unknown device {value!r}; use one of {DEVICE_FORMATS} (N a GPU index, e.g. cuda:0)")
        return value


class MethodChoice(Strict):
    name: str = "lora"


class TrackingConfig(Strict):
    uri: str | None = None
    experiment: str | None = None


class Choices(Strict):
    """A categorical parameter: `{choices: [...]}`."""

    choices: list[Any] = Field(min_length=1)


class Range(Strict):
    """A numeric parameter: `{low, high}` with optional `log: true` or `step`. Integer bounds
    give an integer parameter."""

    low: float | int
    high: float | int
    log: bool = False
    step: float | int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a range is either log or stepped, not both")
        return self

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)


def parse_distribution(value: Any) -> Choices | Range | bool | int | float | str | None:
    """`{choices: [...]}`, `{low, high[, log][, step]}`, or a bare value (fixed, not searched)."""
    if isinstance(value, (Choices, Range)) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        kind = Choices if "choices" in value else Range if {"low", "high"} & set(value) else None
        if kind is not None:
            try:
                return kind.model_validate(value)
            except ValidationError as err:
                raise ValueError(describe_validation_errors(err)[0]) from None
    raise ValueError(f"expected {{choices: [...]}}, {{low, high[, log][, step]}} or a fixed value, got {value!r}")


Distribution = Annotated[Any, BeforeValidator(parse_distribution)]

SEARCHABLE_TRAIN_KEYS = ("learning_rate", "max_epochs", "patience", "batch_size", "weight_decay", "optimizer", "momentum",
                         "augment")


class SearchConfig(Strict):
    """The Optuna search space as data. `params`: `method` and train keys; `methods`: per method,
    distributions over its own options, sampled only when that method is drawn."""

    n_trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)
    sampler: dict[str, Any] = Field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = Field(default_factory=lambda: {"name": "median"})
    params: dict[str, Distribution] = Field(default_factory=dict)
    methods: dict[str, dict[str, Distribution]] = Field(default_factory=dict)
    # a worker marks itself alive this often; a RUNNING trial silent for grace_period is stale
    heartbeat_interval: float = Field(20.0, gt=0)
    grace_period: float = Field(120.0, gt=0)
    # which completed trials keep their adapter artifacts (retention.py): `all`, or `best:N` (the N
    # best trials); default (null): every PEFT adapter, and the best 3 full fine-tunings
    keep_adapters: str | None = None
    # trials a new study runs first (Optuna's enqueue_trial), e.g. known-good settings:
    # {parameter: value} named as the space names them (method, learning_rate, lora.rank); the
    # parameters a trial draws that an entry leaves out are sampled as usual
    enqueue: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("keep_adapters")
    @classmethod
    def _keep_policy(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"all|best:[1-9][0-9]*", value):
            raise ValueError(f"expected 'all' or 'best:N' (N >= 1, e.g. best:3), got {value!r}")
        return value

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key != "method" and key not in SEARCHABLE_TRAIN_KEYS:
                raise ValueError(f"unknown search parameter {key!r}; use 'method' or one of {list(SEARCHABLE_TRAIN_KEYS)}")
        return value

    @field_validator("sampler", "pruner")
    @classmethod
    def _named(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("name"), str):
            raise ValueError("needs a 'name'")
        return value

    def search_values(self, key: str) -> list[Any]:
        """The values that bound a parameter, for checking them before a study starts."""
        if key not in self.params:
            return []
        spec = self.params[key]
        if isinstance(spec, Choices):
            return list(spec.choices)
        if isinstance(spec, Range):
            return [spec.low, spec.high]
        return [spec]


class CompareConfig(Strict):
    """`hpo-peft compare`: per shots x seed, a small study per method selects on validation, within
    the same label budget at every K: with `kfold`, K images per class; with `holdout`, K + val_shots
    where `val_shots: shots` (default) means K_val = K."""

    methods: list[str] = Field(default_factory=lambda: ["zero_shot", "linear_probe", "clap", "lora"], min_length=1)
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    trials_per_method: int = Field(4, ge=1)
    val_shots: Literal["shots"] | Annotated[int, Field(ge=1)] = "shots"

    @field_validator("shots")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value):
            raise ValueError("shots must be >= 1")
        return value

    @field_validator("methods", "shots", "seeds")
    @classmethod
    def _each_once(cls, value: list, info) -> list:
        # a repeated value would run its grid points twice and count them twice in the mean and std
        repeated = next((v for i, v in enumerate(value) if v in value[:i]), None)
        if repeated is not None:
            what = {"shots": "shot count", "seeds": "seed", "methods": "method"}[info.field_name]
            raise ValueError(f"{repeated!r} is listed more than once in {value}; list each {what} once")
        return value


class StudyConfig(Strict):
    name: str = "study"
    # `study`: this package's trials (early stopping, best epoch). `course`: the course notebook's
    # own experiment, reproduced exactly (its sampler, resize, fixed epochs, last weights; see course.py)
    protocol: Literal["study", "course"] = "study"
    demo_kit: Path | None = None
    # folder for black-box features, shared across processes; unset: in memory, once per process
    feature_cache: Path | None = None
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodChoice = Field(default_factory=MethodChoice)
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # per-method training defaults over `train`, e.g. the course's SGD for black-box adapters
    method_train: dict[str, dict[str, Any]] = Field(default_factory=dict)
    search: SearchConfig = Field(default_factory=SearchConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def train_for(self, method: str, **values: Any) -> TrainConfig:
        """`train`, then the method's own defaults, then `values` (e.g. sampled ones)."""
        return TrainConfig.model_validate({**self.train.model_dump(), **self.method_train.get(method, {}), **values})

    @model_validator(mode="after")
    def _course_trains_on_the_images_as_they_are(self) -> "StudyConfig":
        augmented = [key for key, train in [("train", self.train.model_dump()), *((f"method_train.{m}", v) for m, v
                     in self.method_train.items())] if train.get("augment", "none") != "none"]
        if self.protocol == "course" and augmented:
            raise ValueError(f"{augmented[0]}.augment: the course protocol trains on the images as they are; "
                             "remove it (or use protocol: study)")
        return self

    @model_validator(mode="after")
    def _prompts_cover_categories(self) -> "StudyConfig":
        missing = [c for c in self.data.categories if c not in self.prompts.descriptions]
        if missing:
            raise ValueError(f"prompts.descriptions has no entry for categories {missing}")
        extra = [c for c in self.prompts.descriptions if c not in self.data.categories]
        if extra:
            raise ValueError(f"prompts.descriptions names categories not in data.categories: {extra}")
        for method, values in self.method_train.items():
            try:
                self.train_for(method)
            except ValidationError as err:
                raise ValueError(describe_validation_errors(err, f"method_train.{method}")[0]) from None
        for key in SEARCHABLE_TRAIN_KEYS:
            for value in self.search.search_values(key):
                try:
                    TrainConfig.model_validate({**self.train.model_dump(), key: value})
                except ValidationError as err:
                    raise ValueError(f"search.params.{key}: value {value!r} is invalid: {err.errors()[0]['msg']}") from None
        return self
