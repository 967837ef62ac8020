"""What a person browsing the MLflow UI reads: run names, markdown descriptions, the objective's
one metric name, values rounded for display, and each trial's learning-curve figure.

Names (set when a run ends; `trial_name`, `session_name`):

| run                   | name                                  |
|-----------------------|---------------------------------------|
| completed trial       | `t043 lora r1 lr1.1e-2: 81.3`         |
| pruned trial          | `t031 zs_linear_probe pruned@9` (older kfold runs: `pruned@fold2`) |
| failed / interrupted  | `t012 full FAILED` / `t012 full KILLED` |
| session parent        | `demo session 2: t006-t007`           |

Full precision stays in the JSON artifacts (`validation_metrics.json`, `test_metrics.json`).
"""

from __future__ import annotations

from typing import Any

OBJECTIVE = "objective_val_balanced_accuracy"  # on every completed trial == Optuna's value; on the parent: the best
OBJECTIVE_SE = "objective_standard_error"  # its binomial standard error from the validation images (evaluate.py)
TAG_BEST = "hpo_peft.best"  # "true" on the study's best trial run only; it moves when a better one appears
TEST_HEADING = "### Evaluated on the test split"
SIGNIFICANT = 6  # digits kept in logged metrics (57.49999999999999 -> 57.5)


def display_value(value: float) -> float:
    """A metric as logged: 6 significant digits, so the UI shows 57.5, not 57.49999999999999."""
    return float(f"{float(value):.{SIGNIFICANT}g}")


def display_param(value: Any) -> Any:
    """A parameter as logged: floats to 4 significant digits (0.01098, not 0.010975055467388254)."""
    return f"{value:.4g}" if isinstance(value, float) else value


def short_number(value: Any) -> str:
    if isinstance(value, float):
        mantissa, _, exponent = f"{value:.1e}".partition("e")
        return f"{mantissa}e{int(exponent)}" if abs(value) < 0.1 else f"{value:.3g}"
    return str(value)


def short_settings(sampled: dict[str, Any]) -> list[str]:
    """The sampled values that tell trials apart: the method's own (`r1` for `lora.rank=1`, `zeros`
    for a categorical string), then the learning rate (`lr1.1e-2`); the other shared training keys
    are in the run's parameters."""
    tokens, learning_rate = [], None
    for key, value in sampled.items():
        name = key.split(".")[-1]
        if name == "learning_rate":
            learning_rate = f"lr{short_number(value)}"
        elif "." not in key:  # `method` and the shared training keys
            continue
        elif isinstance(value, str):
            tokens.append(value)
        else:
            tokens.append("".join(part[0] for part in name.split("_")) + short_number(value))
    tokens.sort(key=lambda token: not token[-1].isdigit())  # numbers first: `r1 zeros`, not `zeros r1`
    return tokens + ([learning_rate] if learning_rate else [])


def trial_label(number: int, method: str, sampled: dict[str, Any]) -> str:
    return " ".join([f"t{number:03d}", method, *short_settings(sampled)])


def trial_name(number: int, method: str, sampled: dict[str, Any], state: str, value: float | None = None,
               pruned_at: str | None = None) -> str:
    """state: Optuna's COMPLETE / PRUNED / FAIL / RUNNING, or MLflow's KILLED."""
    if state == "COMPLETE":
        return f"{trial_label(number, method, sampled)}: {value:.1f}"
    if state == "PRUNED":
        return f"t{number:03d} {method} pruned@{pruned_at}" if pruned_at else f"t{number:03d} {method} pruned"
    if state in ("FAIL", "FAILED", "KILLED"):
        return f"t{number:03d} {method} {'KILLED' if state == 'KILLED' else 'FAILED'}"
    return trial_label(number, method, sampled)


def session_name(study: str, session: int, numbers: list[int] | None = None) -> str:
    if numbers is None:
        return f"{study} session {session} (running)"
    if not numbers:
        return f"{study} session {session}: no trials"
    return f"{study} session {session}: t{min(numbers):03d}-t{max(numbers):03d}"


def defining_params(method: str, sampled: dict[str, Any], train: dict[str, Any], base_train: dict[str, Any],
                    options: dict[str, Any]) -> dict[str, Any]:
    """What defines a trial: its method, the method's effective options, and the training settings
    that were sampled or differ from the config's `train` section (e.g. a black-box adapter's SGD);
    constants shared by every trial (device, precision, ...) stay in the parent's config.json."""
    drawn = {key.split(".")[-1] for key in sampled}
    settings = {f"train.{k}": v for k, v in train.items() if k in drawn or v != base_train.get(k)}
    params = {"method": method, **settings, **{f"{method}.{k}": v for k, v in options.items()}}
    return {k: display_param(v) for k, v in params.items() if v is not None}


# descriptions (mlflow.note.content) ------------------------------------------------------------
def _budget(data) -> str:
    if data.validation == "kfold":
        return (f"{data.shots} labelled images per class, validated inside them by {data.n_folds}-fold "
                "cross-validation (adapter refit on all shots for the epoch where the folds' mean curve peaks)")
    refit = "; adapter refit on all of them for the best epoch" if data.refit else ""
    return (f"{data.shots} training + {data.val_shots} validation images per class "
            f"({data.labels_per_class} labels per class; early stopping on the validation images{refit})")


def objective_line(data) -> str:
    mean = " (mean over folds)" if data.validation == "kfold" else ""
    return (f"`{OBJECTIVE}`: balanced accuracy (%) on the validation images at the selected epoch{mean}, "
            "maximised; ties go to the lower validation loss, then fewer trainable parameters, then the earlier trial")


def study_description(config, study: str) -> str:
    data, model = config.data, config.model
    revision = f" @ {model.revision}" if model.revision else ""
    methods = getattr(config.search.params.get("method"), "choices", None) or [config.method.name]
    return "\n".join([
        f"## Study `{study}`",
        f"Which way to adapt `{model.name_or_path}`{revision} to `{data.root.name}` from a few labelled images.",
        "",
        f"- **Dataset**: `{data.root}`; training table `{data.train_table}` (shots and validation images drawn "
        f"from it), test table `{data.test_table}` (read only by `hpo-peft evaluate`); images in `{data.images_dir}/`",
        f"- **Classes**: {', '.join(data.categories)}",
        f"- **Label budget**: {_budget(data)}",
        f"- **Seed**: {data.seed} (shot sampling and training)",
        f"- **Backbone**: `{model.name_or_path}`{revision}, precision `{config.train.precision}`",
        f"- **Methods searched**: {', '.join(methods)}",
        f"- **Objective**: {objective_line(data)}",
        "",
        "One parent run per `hpo-peft study run` session, one child run per trial, named "
        f"`tNNN method settings: score`; the best trial carries the tag `{TAG_BEST}=true`.",
    ])


def session_description(study: str, session: int, config, numbers: list[int], counts: dict[str, int],
                        best: tuple[str, str, float] | None, experiment_id: str) -> str:
    """best: (run name, run id, objective) of the study's best trial so far."""
    search = config.search
    lines = [
        f"## {session_name(study, session, numbers)}",
        f"Trials {', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items())) or 'none'} in this session; "
        f"sampler `{search.sampler.get('name')}`, pruner `{search.pruner.get('name')}`.",
        "",
        f"- **Label budget**: {_budget(config.data)}; seed {config.data.seed}",
        f"- **Backbone**: `{config.model.name_or_path}`",
        f"- **Objective**: {objective_line(config.data)}",
    ]
    if best is not None:
        name, run_id, value = best
        lines.append(f"- **Best trial of the study**: [{name}](#/experiments/{experiment_id}/runs/{run_id}"
                     f"?workflowType=machine_learning) ({OBJECTIVE} {value:.2f})")
    lines += ["", "The full config is in `config.json`; Optuna's figures are the artifacts `*.png`."]
    return "\n".join(lines)


def trial_description(params: dict[str, Any], state: str, objective: float | None = None,
                      selected_epoch: int | None = None, trainable: int | None = None, scheme: str | None = None,
                      note: str | None = None, refit: bool = False, standard_error: float | None = None) -> str:
    lines = []  # the UI shows the run's name above its description
    if objective is not None:
        lines.append(f"- **Objective** `{OBJECTIVE}`: {objective:.2f}"
                     + (f" ± {standard_error:.2f} (standard error, from the validation images)" if standard_error else "")
                     + (" (mean over folds)" if scheme == "kfold" else ""))
    if selected_epoch:
        kept = ("refit length (the peak of the folds' mean curve)" if scheme == "kfold" else
                "best validation epoch; adapter refit on all labels for as many epochs" if refit else
                "best validation epoch, weights kept")
        lines.append(f"- **Selected epoch**: {selected_epoch} ({kept})")
    if trainable is not None:
        lines.append(f"- **Trainable parameters**: {trainable:,}")
    lines.append(f"- **State**: {state}" + (f": {note}" if note else ""))
    lines += ["", "| setting | value |", "|---|---|", *(f"| `{k}` | {v} |" for k, v in params.items())]
    return "\n".join(lines)


def test_section(validation: float | None, test: float, per_class: dict[str, float]) -> str:
    """Appended to an evaluated trial's description: validation beside test."""
    gap = f" | {validation - test:+.2f} |" if validation is not None else " | |"
    val = f"{validation:.2f}" if validation is not None else "n/a"
    return "\n".join([
        "", TEST_HEADING, "",
        "| balanced accuracy (%) | validation (selection) | test | validation - test |", "|---|---|---|---|",
        f"| | {val} | {test:.2f}{gap}",
        "", "Test recall per class: " + ", ".join(f"{c} {'no image' if r != r else f'{r:.1f}%'}"  # NaN: no image
                                                  for c, r in per_class.items()),
    ])


# figures ---------------------------------------------------------------------------------------
def learning_curve_figure(history: list, selected_epoch: int | None, title: str):
    """Train and validation loss, validation balanced accuracy, the selected epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m.epoch for m in history]
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss.plot(epochs, [m.train_loss for m in history], marker=".", label="train loss")
    loss.plot(epochs, [m.val_loss for m in history], marker=".", label="validation loss")
    loss.set_xlabel("epoch")
    loss.set_ylabel("cross-entropy loss")
    accuracy.plot(epochs, [m.val_balanced_accuracy for m in history], marker=".", color="tab:green",
                  label="validation balanced accuracy")
    accuracy.set_xlabel("epoch")
    accuracy.set_ylabel("balanced accuracy (%)")
    for axes in (loss, accuracy):
        if selected_epoch:
            axes.axvline(selected_epoch, color="tab:red", linestyle="--", label=f"selected epoch {selected_epoch}")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
