"""Every check of user input, in one place, run once per command before anything is loaded or
written: the config's methods and options, the device, the search space, the sampler and pruner,
the command-line numbers, the tables and images each grid point will read. A failing check is one
`UserError` line naming the key, file or row (the CLI prints it, exit code 2).

`config.py` already refuses unknown keys, wrong types and impossible ranges as config_file.py reads the YAML;
what needs the method registry, torch or the data files is checked here.
"""

from __future__ import annotations

from pydantic import ValidationError

from hpo_peft.core.config import (
    SEARCHABLE_TRAIN_KEYS,
    Choices,
    Range,
    SearchConfig,
    StudyConfig,
    describe_validation_errors,
)
from hpo_peft.data import few_shot_rows, reader_for
from hpo_peft.core.errors import UserError
from hpo_peft.methods import get_method, method_config
from hpo_peft.models import family_of
from hpo_peft.core.runtime import resolve_device
from hpo_peft.fewshot.validation import grid_point


def check_config(config: StudyConfig) -> None:
    """What every command needs: known methods with valid options, a device this machine has."""
    resolve_device(config.train.device)  # e.g. cuda on a machine without it
    get_method(config.method.name, key="method.name")
    for name, options in config.methods.items():
        _fits_family(config, name, options)
    for name in [*config.method_train, *config.compare.methods]:
        get_method(name, key="method_train" if name in config.method_train else "compare.methods")
    for name, values in config.method_train.items():
        _sees_images(name, values, f"method_train.{name}.augment")
    if config.protocol == "course" and not reader_for(config.data).in_files:
        raise UserError(f"protocol: course decodes image files as the course's notebook does; data.format "
                        f"{config.data.format} keeps its images inside the dataset: use protocol: study")


def _fits_family(config: StudyConfig, name: str, options: dict | None, key: str = "methods", drawn: str = "") -> None:
    """Valid options (`key` named on error) that the model's family can run: a fused-q/k/v family
    refuses LoRA's other targets and dropout here, in one line, not as a failed trial."""
    method, family = get_method(name, key), family_of(config.model)
    checked = method_config(name, options, key=key)
    try:
        method.check_family(checked, family.encoder.module_names)
    except UserError as err:
        raise UserError(f"{drawn}{err} (model.family {family.name})") from None


def _sees_images(method: str, keys, where: str) -> None:
    """`augment` for a method on frozen features would be recorded and never applied."""
    if "augment" in keys and not get_method(method).trains_encoder:
        raise UserError(f"{where}: {method} trains on features computed once and never sees an image to augment; "
                        "remove it")


def check_space(config: StudyConfig) -> None:
    """Every method the space can draw exists, and every bound of its options is valid."""
    spec = config.search.params.get("method", config.method.name)
    methods = spec.choices if isinstance(spec, Choices) else [spec]
    for name in methods:
        _fits_family(config, name, config.methods.get(name), key="search.params.method" if name not in config.methods else "methods")
    for name, space in config.search.methods.items():
        method_config(name, {}, key="search.methods")
        _sees_images(name, space, f"search.methods.{name}.augment")
        for option, dist in space.items():
            bounds = dist.choices if isinstance(dist, Choices) else [dist.low, dist.high] if isinstance(dist, Range) else [dist]
            for value in bounds:
                if option not in SEARCHABLE_TRAIN_KEYS:
                    _fits_family(config, name, {**config.methods.get(name, {}), option: value}, key="search.methods",
                                 drawn=f"search.methods.{name}.{option} can draw {value!r}: ")
                    continue
                try:
                    config.train_for(name, **{option: value})
                except ValidationError as err:
                    raise UserError(f"search.methods.{name}.{option}: value {value!r} is invalid: "
                                    f"{describe_validation_errors(err)[0]}") from None
    check_enqueued(config.search)


def check_enqueued(search: SearchConfig) -> None:
    """Each `search.enqueue` entry names parameters the space draws, with values inside it."""
    for number, entry in enumerate(search.enqueue):
        for name, value in entry.items():
            method, _, own = name.rpartition(".")
            spec = search.methods.get(method, {}).get(own) if method else search.params.get(name)
            where = f"search.enqueue[{number}]"
            if spec is None or (method and entry.get("method") not in (None, method)):
                names = [*search.params, *(f"{m}.{key}" for m, space in search.methods.items() for key in space)]
                problem = (f"{name!r} is not a parameter the search space draws"
                           f"{' in a ' + str(entry['method']) + ' trial' if method and 'method' in entry else ''}; it draws {names}")
            elif isinstance(spec, Choices):
                problem = None if value in spec.choices else f"{name} = {value!r} is not among its choices {spec.choices}"
            elif isinstance(spec, Range):
                inside = isinstance(value, (int, float)) and spec.low <= value <= spec.high
                problem = None if inside else f"{name} = {value!r} is outside its range [{spec.low}, {spec.high}]"
            else:
                problem = None if value == spec else f"{name} is fixed at {spec!r} by the search space, not {value!r}"
            if problem:
                raise UserError(f"{where}: {problem} (a changed space: change the entry, or drop the entries "
                                "with --set search.enqueue=[])")


def check_session(n_trials: int | None, timeout: float | None, jobs: int) -> None:
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if n_trials is not None and n_trials < 1:
        raise UserError(f"--n-trials must be at least 1, got {n_trials}")
    if timeout is not None and not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout:g}")


def check_study_data(config: StudyConfig) -> None:
    """A study can validate, its sampler and pruner build, and its tables and images are there."""
    from hpo_peft.study.samplers import make_pruner, make_sampler

    if not config.data.selects:
        raise UserError(f"data.validation: kfold needs at least 2 shots per class to validate, got {config.data.shots}; "
                        "use more shots, holdout validation, or `hpo-peft trial` for fixed settings")
    make_sampler(config)
    make_pruner(config)
    few_shot_rows(config.data)


def check_compare_data(config: StudyConfig) -> None:
    """Every grid point of `compare` has enough rows and its images, before any training."""
    for shots in config.compare.shots:
        for seed in config.compare.seeds:
            few_shot_rows(grid_point(config, shots, seed).data)
