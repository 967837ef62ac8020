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

from hpo_peft.core.data_config import FORMAT_DEFAULTS, IMAGE_SUFFIXES, DataConfig  # noqa: F401 (re-exported)

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
# prompts.templates for classes not the course's (each described by its own name unless prompts.descriptions says)
GENERIC_TEMPLATES = ["a histopathology image of [CLS].", "an H&E stained image showing [CLS].",
                     "a histology slide showing [CLS].", "pathology tissue showing [CLS].", "a microscopy image of [CLS]."]


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


class ModelConfig(Strict):
    name_or_path: str = "vinid/plip"
    revision: str | None = None
    family: Literal["hf_clip", "open_clip", "conch"] | None = None  # None: inferred from name_or_path (models/)


class PromptConfig(Strict):
    """Unset, both follow the classes (StudyConfig fills them in, `for_classes`)."""

    templates: list[str] | None = Field(None, min_length=1)
    descriptions: dict[str, list[str]] | None = None

    @field_validator("templates")
    @classmethod
    def _has_placeholder(cls, value: list[str] | None) -> list[str] | None:
        for template in value or []:
            if "[CLS]" not in template:
                raise ValueError(f"template {template!r} has no [CLS] placeholder")
        return value

    def for_classes(self, categories: list[str]) -> "PromptConfig":
        """Unset templates and descriptions: the course's where a class is one of the course's, else
        GENERIC_TEMPLATES; then one description list per class, a class left out described by its name."""
        course = bool(set(categories) & set(COURSE_DESCRIPTIONS))
        templates = self.templates if self.templates is not None else list(COURSE_TEMPLATES if course else GENERIC_TEMPLATES)
        given = self.descriptions if self.descriptions is not None else (dict(COURSE_DESCRIPTIONS) if course else {})
        if extra := [c for c in given if c not in categories]:
            raise ValueError(f"prompts.descriptions names categories not in data.categories: {extra}" + (
                "" if self.descriptions is not None else " (the course's, the default for its classes: give prompts.descriptions)"))
        return PromptConfig(templates=templates, descriptions={c: list(given.get(c, [c])) for c in categories})


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
    # the study's model: its top N trials by selection score, their class probabilities averaged
    # (fewshot/ensemble.py; built by `evaluate`); 1: the best trial alone
    ensemble: int = Field(1, ge=1, le=20)
    # trials a new study runs first (Optuna's enqueue_trial), e.g. known-good settings:
    # {parameter: value} named as the space names them (method, learning_rate, lora.rank); the
    # parameters a trial draws that an entry leaves out are sampled as usual
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    # what a new study runs after `enqueue`, before its sampler (search_space.py): race, each method once at
    # its priors; portfolio, configurations that did well across the search benchmark's kits (portfolio.py)
    start: Literal["sampler", "race", "portfolio"] = "sampler"
    # a session's compute budget (compute_budget.py): `300e` epochs trained (folds and refits included),
    # or `20m` / `90s` / `2h` of the trials' own training time; no new trial once its trials spent it
    budget: str | None = None

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_format(cls, value: Any) -> str | None:
        if value is not None:
            cls.parse_budget(str(value))  # a malformed one is refused, naming the forms it takes
        return None if value is None else str(value).strip()

    @staticmethod
    def parse_budget(text: str) -> tuple[float, str]:
        """`300e` -> (300.0, "e"): whole epochs, or the trials' training time in s, m or h."""
        found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([emsh])\s*", text.lower())
        if found is None or float(found[1]) <= 0 or (found[2] == "e" and not float(found[1]).is_integer()):
            raise ValueError(f"expected a number above 0 and a unit: 300e (whole epochs trained), 20m, 90s or 2h "
                             f"(the trials' training time), got {text!r}")
        return float(found[1]), found[2]

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


# training settings from a method's paper: its defaults under `method_train.<name>`, which overrides
# them key by key; filled into `method_train` for the methods a config names (so the study's shared
# space leaves them alone and the fingerprint records them), and under `train_for` for any other
PAPER_TRAIN: dict[str, dict[str, Any]] = {
    # Tip-Adapter-F: AdamW (PyTorch's weight decay 0.01, the paper's code), lr 1e-3, 20 epochs, batch 256
    "tip_adapter_f": {"optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 0.01, "max_epochs": 20, "batch_size": 256},
    # CoOp and KgCoOp (Dassl): SGD momentum 0.9, weight decay 5e-4, lr 0.002, 200 epochs, batch 32
    **{name: {"optimizer": "sgd", "learning_rate": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "max_epochs": 200,
              "batch_size": 32} for name in ("coop", "kgcoop")},
}


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
        return TrainConfig.model_validate({**self.train.model_dump(), **PAPER_TRAIN.get(method, {}),
                                           **self.method_train.get(method, {}), **values})

    def methods_named(self) -> set[str]:
        """Every method the config names: to train, to search, to compare, or with options."""
        drawn = self.search.params.get("method")
        named = {self.method.name, *self.compare.methods, *self.methods, *self.search.methods,
                 *(entry.get("method") for entry in self.search.enqueue)}
        return named | set(drawn.choices if isinstance(drawn, Choices) else [drawn] if isinstance(drawn, str) else [])

    @model_validator(mode="after")
    def _course_trains_on_the_images_as_they_are(self) -> "StudyConfig":
        augmented = [key for key, train in [("train", self.train.model_dump()), *((f"method_train.{m}", v) for m, v
                     in self.method_train.items())] if train.get("augment", "none") != "none"]
        if self.protocol == "course" and augmented:
            raise ValueError(f"{augmented[0]}.augment: the course protocol trains on the images as they are; "
                             "remove it (or use protocol: study)")
        return self

    @model_validator(mode="after")
    def _paper_defaults(self) -> "StudyConfig":
        named = {m for m in self.methods_named() if m in PAPER_TRAIN}
        filled = {**self.method_train, **{m: {**PAPER_TRAIN[m], **self.method_train.get(m, {})} for m in sorted(named)}}
        if filled != self.method_train:  # set without validate_assignment (this validator would run again)
            self.__dict__["method_train"] = filled
        return self

    @model_validator(mode="after")
    def _prompts_cover_categories(self) -> "StudyConfig":
        resolved = self.prompts.for_classes(self.data.categories)
        if resolved != self.prompts:  # set without validate_assignment: this validator would run again
            self.__dict__["prompts"] = resolved
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
