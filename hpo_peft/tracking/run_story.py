"""What a person browsing the MLflow UI reads: run names, markdown descriptions, the objective's
one metric name, values rounded for display, and each trial's learning-curve figure.

Names (set when a run ends; `trial_name`, `session_name`):

| run                   | name                                  |
|-----------------------|---------------------------------------|
| completed trial       | `t043 lora r1 lr1.1e-2: 81.3`         |
| the study's pick      | `★ t043 lora r1 lr1.1e-2: 81.3` (the mark moves with the best, `run_record.sync_ranks`) |
| pruned trial          | `t031 zs_linear_probe pruned@9` (older kfold runs: `pruned@fold2`) |
| failed / interrupted  | `t012 full FAILED` / `t012 full KILLED` |
| session parent        | `demo session 2: t006-t007`           |
| `compare`'s trials    | the grid point first: `K4 s1 t000 lora r1 lr1.1e-2: 81.3` |

Full precision stays in the JSON artifacts (`validation_metrics.json`, `test_metrics.json`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the validation schemes pull in the training stack: imported where they are used
    from hpo_peft.fewshot.validation import Scheme

OBJECTIVE = "objective_val_balanced_accuracy"  # on every completed trial == Optuna's value; on the parent: the best
OBJECTIVE_SE = "objective_standard_error"  # its binomial standard error from the validation images (evaluate.py)
TAG_BEST = "hpo_peft.best"  # "true" on the study's best trial run only; it moves when a better one appears
RANK = "selection_rank"  # every completed trial's place in the selection (selection.ranks), 1 = the pick
BEST_MARK = "★ "  # leads the pick's run name
TAG_PRUNED_BECAUSE = "hpo_peft.pruned_because"  # a pruned trial's run: why (`prune_reason`)
MIN_COMPLETE_FOR_IMPORTANCE = 8  # and 2 per searched parameter (`importance_note`)
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
               pruned_at: str | None = None, label: str | None = None) -> str:
    """state: Optuna's COMPLETE / PRUNED / FAIL / RUNNING, or MLflow's KILLED; `label` leads (compare's
    grid point, `K4 s1`)."""
    lead = f"{label} " if label else ""
    if state == "COMPLETE":
        return f"{lead}{trial_label(number, method, sampled)}: {value:.1f}"
    if state == "PRUNED":
        return f"{lead}t{number:03d} {method} pruned" + (f"@{pruned_at}" if pruned_at else "")
    if state in ("FAIL", "KILLED"):
        return f"{lead}t{number:03d} {method} {'KILLED' if state == 'KILLED' else 'FAILED'}"
    return lead + trial_label(number, method, sampled)


def marked(name: str, best: bool) -> str:
    """The run name with the pick's mark in front, or without it."""
    bare = name.removeprefix(BEST_MARK)
    return BEST_MARK + bare if best else bare


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
    from hpo_peft.fewshot.validation import SCHEMES

    return SCHEMES[data.validation].budget(data)


def objective_line(data) -> str:
    from hpo_peft.fewshot.validation import SCHEMES

    mean = SCHEMES[data.validation].score_note()
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
                      selected_epoch: int | None = None, trainable: int | None = None, scheme: Scheme | None = None,
                      note: str | None = None, refit: bool = False, standard_error: float | None = None) -> str:
    lines = []  # the UI shows the run's name above its description
    if objective is not None:
        lines.append(f"- **Objective** `{OBJECTIVE}`: {objective:.2f}"
                     + (f" ± {standard_error:.2f} (standard error, from the validation images)" if standard_error else "")
                     + (scheme.score_note() if scheme else ""))
    if selected_epoch:
        kept = scheme.kept_epoch(refit) if scheme else "best validation epoch, weights kept"
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


def history_figure(trials: list):
    """The optimisation history: each completed trial's score with its standard-error bar, each
    pruned trial's last reported value (drawn apart: a different quantity, one epoch's), the best so
    far and the pick (the selection's order, tie-breaks included)."""
    import matplotlib
    from optuna.trial import TrialState

    from hpo_peft.tracking.selection import STANDARD_ERROR_ATTR, select_best, selection_key

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    completed = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    failed = sum(t.state == TrialState.FAIL for t in trials)
    figure, axes = plt.subplots(figsize=(11, 6))
    if completed:
        errors = [t.user_attrs.get(STANDARD_ERROR_ATTR, math.nan) for t in completed]
        axes.errorbar([t.number for t in completed], [t.value for t in completed], yerr=errors, fmt="o",
                      color="tab:blue", ecolor="tab:blue", elinewidth=1, capsize=3, alpha=0.8,
                      label=f"completed ({len(completed)}): {OBJECTIVE} ± standard error")
        best, steps = None, []
        for trial in completed:
            best = trial if best is None or selection_key(trial) < selection_key(best) else best
            steps.append(best.value)
        axes.step([t.number for t in completed], steps, where="post", color="tab:red", label="best so far")
        pick = select_best(completed)
        axes.plot([pick.number], [pick.value], marker="*", markersize=16, color="gold", markeredgecolor="black",
                  linestyle="none", label=f"the pick: trial {pick.number}")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        axes.scatter([t.number for t in pruned], last, marker="x", color="tab:gray",
                     label=f"pruned ({len(pruned)}): last reported epoch's val_balanced_accuracy")
    axes.set_xlabel("trial")
    axes.set_ylabel(f"{OBJECTIVE} (%)")
    axes.set_title(f"Optimisation history: {len(completed)} completed, {len(pruned)} pruned, {failed} failed")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return figure


def importance_note(trials: list) -> str | None:
    """Why the parameter importances are left out (too few completed trials to rank parameters by:
    fewer than MIN_COMPLETE_FOR_IMPORTANCE or 2 per searched parameter), or None."""
    from optuna.trial import TrialState

    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    searched = {name for t in completed for name in t.params}
    need = max(MIN_COMPLETE_FOR_IMPORTANCE, 2 * len(searched))
    if len(completed) >= need:
        return None
    return (f"**Parameter importances** are left out: {len(completed)} completed trials for {len(searched)} searched "
            f"parameters; they need at least {need} (2 per parameter, and {MIN_COMPLETE_FOR_IMPORTANCE} or more) "
            "to say more than noise.")


def _ordinal(q: float) -> str:
    text = f"{q:g}"
    if "." in text or text.endswith(("11", "12", "13")) or text[-1] not in "123":
        return f"{text}th"
    return text + {"1": "st", "2": "nd", "3": "rd"}[text[-1]]


def prune_reason(pruner, completed: list, values: dict[int, float], epoch: int, maximize: bool = True) -> str:
    """Why the pruner stopped a trial at `epoch`, recomputed as Optuna decides it: a percentile (or
    median) pruner compares the trial's best value so far with that percentile of the completed
    trials' values at the same epoch, a threshold pruner the epoch's value with its bounds; for
    other pruners, which pruned it."""
    import numpy as np
    from optuna.pruners import PercentilePruner, ThresholdPruner

    name = type(pruner).__name__
    plain = f"pruned by {name} at epoch {epoch}"
    try:
        if isinstance(pruner, PercentilePruner):
            theirs = [t.intermediate_values[epoch] for t in completed if epoch in t.intermediate_values]
            if not theirs or np.isnan(theirs).all():
                return plain
            q = 100.0 - pruner._percentile if maximize else pruner._percentile
            bar = float(np.nanpercentile(theirs, q))
            mine = float(np.nanmax(list(values.values())) if maximize else np.nanmin(list(values.values())))
            which = "median" if q == 50 else f"{_ordinal(q)} percentile"
            return (f"{mine:.1f} {'<' if maximize else '>'} {which} {bar:.1f} at epoch {epoch} (its best so far vs "
                    f"{len(theirs)} completed trial{'s' if len(theirs) != 1 else ''}; {name})")
        if isinstance(pruner, ThresholdPruner) and epoch in values:
            value, lower, upper = values[epoch], pruner._lower, pruner._upper
            if value < lower:
                return f"{value:.1f} < lower bound {lower:g} at epoch {epoch} ({name})"
            if value > upper:
                return f"{value:.1f} > upper bound {upper:g} at epoch {epoch} ({name})"
    except (AttributeError, TypeError, ValueError):  # another Optuna's internals: say only who pruned
        return plain
    return plain


def confusion_title(split: str, confusion: list[list[int]], score: float, epoch: int | None = None,
                    window: tuple[int, int] | None = None, folds: int = 0, trained: bool = True) -> str:
    """A confusion matrix's title: the epoch whose cells it draws, with their balanced accuracy,
    apart from the score, which averages a window of epochs (validation.score_window)."""
    rows = [(row[i], sum(row)) for i, row in enumerate(confusion) if sum(row)]
    cells = 100.0 * sum(right / n for right, n in rows) / len(rows) if rows else math.nan
    if folds and not trained:  # a method that trains nothing (zero-shot, Tip-Adapter), scored on each fold
        return f"{split}: {folds} folds' cells summed ({cells:.1f}%)\nscore {score:.1f}%: mean over folds"
    if folds:
        return (f"{split}: {folds} folds' cells summed, each at its scored epoch ({cells:.1f}%)\n"
                f"score {score:.1f}%: mean over folds, each of its epoch window")
    if epoch is None:
        return f"{split}\nbalanced accuracy {score:.1f}%"
    first, last = window or (epoch, epoch)
    span = f"epoch {epoch} alone" if first == last else f"mean of epochs {first}-{last}"
    return f"{split}: cells of epoch {epoch}, balanced accuracy {cells:.1f}%\nscore {score:.1f}% ({span})"


def version_description(study: str | None, run_name: str, run_id: str, metrics: dict, params: dict) -> str:
    """A registered model version's description: where it comes from, its selection and test
    scores, and the label budget it was chosen within."""
    def score(key: str, error: str) -> str:
        if key not in metrics:
            return "not recorded"
        return f"{metrics[key]:.2f}" + (f" ± {metrics[error]:.2f}" if error in metrics else "")

    validation = params.get("data.validation")
    budget = (f"{params['labels_per_class']} labels per class" if "labels_per_class" in params else "not recorded") + (
        f", validation `{validation}`" if validation else "") + (", refit on all labels" if params.get("data.refit") == "True" else "")
    return "\n".join([
        f"hpo-peft adapter from study `{study or 'unknown'}`, run `{run_name}` ({run_id}); method `{params.get('method', '?')}`.",
        "",
        f"- **Selection score** (`{OBJECTIVE}`, validation balanced accuracy %): {score(OBJECTIVE, OBJECTIVE_SE)}",
        f"- **Test balanced accuracy** (%): {score('test_balanced_accuracy', 'test_standard_error')}",
        f"- **Label budget**: {budget}",
    ])
