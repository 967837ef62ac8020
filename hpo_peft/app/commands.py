"""What each CLI command does, in the order a user would expect: validate the config, make the
demo kit if the config asks for it, then the work, then a readable report."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from hpo_peft.core.config import StudyConfig
from hpo_peft.core.config_file import load_config
from hpo_peft.core.errors import UserError
from hpo_peft.fewshot.evaluate import format_confusion


def prepare_config(path: Path, overrides: list[str], method: str | None = None, study: bool = False) -> StudyConfig:
    """Load and fully validate a config (method names and options, with `study` the search space
    too) before anything is built or loaded; then make the demo kit if the config asks for it."""
    from hpo_peft.study import preflight

    config = load_config(path, overrides)
    if method is not None:
        config.method.name = method
    preflight.check_config(config)
    if study:
        preflight.check_space(config)
    if config.demo_kit is not None:
        from hpo_peft.demo_kit import build_demo_kit

        build_demo_kit(config.demo_kit)
    return config


def run_single_trial(path: Path, overrides: list[str], method: str | None, save: Path | None, as_json: bool) -> None:
    """One method with fixed settings: the package's trial (`protocol: study`, validated as
    `data.validation` says) or the course notebook's own experiment (`protocol: course`)."""
    from hpo_peft.fewshot.artifacts import save_adapter

    config = prepare_config(path, overrides, method)
    if save is not None and save.exists() and any(save.iterdir()):
        raise UserError(f"{save}: adapter folder exists and is not empty")
    name = config.method.name
    if not as_json:
        data = config.data
        scheme = f", {data.validation} validation" + (" (refit on all labels)" if data.refit else "")
        print(f"method {name}; model {config.model.name_or_path}; {data.shots} shots/class, seed {data.seed}; "
              f"protocol {config.protocol}" + (scheme if config.protocol == "study" else ""))

    from hpo_peft.fewshot.validation import scheme_of

    folds_are_scored = scheme_of(config.data).folds_are_scored

    def report(epoch):
        if as_json:
            return
        fold = f"fold {epoch.fold + 1}  " if getattr(epoch, "fold", None) is not None else \
            "mean    " if folds_are_scored else ""
        val = "" if getattr(epoch, "val_loss", None) is None else (
            f"  val loss {epoch.val_loss:.4f}  val balanced acc {epoch.val_balanced_accuracy:.2f}%")
        print(f"{fold}epoch {epoch.epoch:3d}  train loss {epoch.train_loss:.4f}{val}")

    if config.protocol == "course":
        result = _course_trial(config, name, report)
    else:  # the printed epochs are its progress; an epoch bar only for --json in a terminal
        result = _study_trial(config, name, report, progress=as_json and sys.stderr.isatty())
    if save is not None:
        save_adapter(save, result["classifier"], result["base"], name, result["method_config"], config, result["saved"])
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("classifier", "base", "lines", "saved")}, indent=2))
        return
    print(f"trainable parameters: {result['trainable_parameters']:,}")
    for line in result["lines"]:
        print(line)
    test = result["test"]
    print(f"test balanced accuracy: {test['balanced_accuracy']:.2f}% ± {test['standard_error']:.2f} (standard error)")
    print("test confusion matrix (rows true, columns predicted):")
    print(format_confusion(test["confusion_matrix"], config.data.categories))
    if save is not None:
        print(f"adapter saved to {save}")


def _study_trial(config: StudyConfig, name: str, report, progress: bool) -> dict:
    from hpo_peft.data import load_test
    from hpo_peft.fewshot.evaluate import evaluate_as_trained
    from hpo_peft.fewshot.settings import merged_train
    from hpo_peft.fewshot.trial import open_workspace, run_trial

    workspace = open_workspace(config)
    test_images = load_test(config.data, workspace.base.preprocessing)  # a bad test table fails before training
    outcome = run_trial(workspace, name, config.methods.get(name, {}), merged_train(config, name), on_epoch=report,
                        progress=progress)
    test = evaluate_as_trained(outcome.classifier, test_images, workspace.base.preprocessing, config.data.categories,
                               outcome.settings)
    lines = outcome.scheme.describe(outcome)
    if outcome.validation is not None:
        where = outcome.scheme.score_where(outcome.refit)
        lines.append(f"validation balanced accuracy: {outcome.validation.balanced_accuracy:.2f}% "
                     f"± {outcome.validation.standard_error:.2f} ({where}; standard error from the validation images)")
    else:
        lines.append("no validation: too few shots to hold any out")
    lines.append(f"labels used per class: {outcome.labels_per_class}")
    return {
        "method": name, "method_config": outcome.method_options, "trainable_parameters": outcome.trainable_parameters,
        "validation_scheme": outcome.scheme.name, "labels_per_class": outcome.labels_per_class,
        "training": outcome.training.as_dict(), "folds": [f.as_dict() for f in outcome.folds],
        "validation": outcome.validation.as_dict() if outcome.validation is not None else None,
        "test": test.as_dict(), "classifier": outcome.classifier, "base": workspace.base, "lines": lines,
        "saved": outcome.adapter_metadata(config.data.shots, config.data.seed),
    }


def _course_trial(config: StudyConfig, name: str, report) -> dict:
    from hpo_peft.fewshot.course import course_rows, run_course_trial
    from hpo_peft.models.classifier import load_base_model

    class Epoch:  # what `report` prints for the course's epochs: the training loss only
        def __init__(self, epoch: int, loss: float):
            self.epoch, self.train_loss = epoch, loss

    course_rows(config.data)  # a bad table or image, or one in both tables: said before the model loads
    base = load_base_model(config.model)
    result = run_course_trial(config, name, on_epoch=lambda epoch, loss: report(Epoch(epoch, loss)), base=base)
    return {
        "method": name, "method_config": result.method_options, "trainable_parameters": result.trainable_parameters,
        "protocol": "course", "labels_per_class": config.data.shots,
        "training": {"train_losses": result.train_losses}, "test": result.test.as_dict(), "test_aca": result.test_aca,
        "classifier": result.classifier, "base": base,
        "saved": {"train": config.train_for(name).model_dump(mode="json") | {"precision": "fp32"},  # the course runs fp32
                  "data": {"shots": config.data.shots, "seed": config.data.seed, "protocol": "course"}},
        "lines": [f"{len(result.train_losses)} epochs, last epoch's weights (the course's protocol: no validation)",
                  f"test ACA (course rounding): {result.test_aca:.2f}"],
    }


def prepare_study_config(path: Path, overrides: list[str]) -> StudyConfig:
    return prepare_config(path, overrides, study=True)


def run_study_command(path: Path, overrides: list[str], options: dict, n_trials: int | None, timeout: float | None,
                      jobs: int = 1, accept_changes: bool = False, total: bool = False, budget: str | None = None) -> None:
    """`budget` (`--budget`, else `search.budget`): the session runs until its trials spent it (or
    --timeout); `n_trials` then caps it only when given."""
    from hpo_peft.study import compute_budget
    from hpo_peft.study.preflight import check_session
    from hpo_peft.tracking.recovery import RUN_ID_ATTR
    from hpo_peft.tracking.selection import STANDARD_ERROR_ATTR, select_best
    from hpo_peft.study.session import StudyLocation, existing_study, run_study

    check_session(n_trials, timeout, jobs)
    compute_budget.parse(budget, "--budget")  # a malformed value: one line naming the flag, before anything loads
    config = prepare_study_config(path, overrides)
    if budget is not None:
        config.search.budget = budget
    spend = compute_budget.parse(config.search.budget)
    if spend is not None and total:
        raise UserError("search.budget: `study worker` counts trials (--n-trials is the study's total over all workers), "
                        "not compute; pass --set search.budget=null, or run the study with `study run --budget`")
    if spend is not None and n_trials is None:
        n_trials = compute_budget.NO_TRIAL_LIMIT  # not search.n_trials: the budget ends the session
    where = StudyLocation.of(config, **options)
    before = set()  # the study's trials before this session, to tell its own apart
    if spend is not None and (existing := existing_study(where)) is not None:
        before = {t.number for t in existing.get_trials(deepcopy=False)}
    study = run_study(config, where, n_trials, timeout, jobs, accept_changes, total)
    states = {}
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    print(f"study {where.study_name!r}: {len(study.trials)} trials ({', '.join(f'{v} {k.lower()}' for k, v in sorted(states.items()))})")
    best = select_best(study.trials)
    if best is None:
        print("no completed trial yet")
    else:
        error = best.user_attrs.get(STANDARD_ERROR_ATTR)  # none on trials from before the package logged it
        print(f"best trial {best.number}: selection score {best.value:.2f}%"
              f"{'' if error is None else f' ± {error:.2f}'}  {best.params}")
    print_ui_links(where, best.user_attrs.get(RUN_ID_ATTR) if best is not None else None)
    if spend is not None:  # the last line: what this session spent
        trials = study.get_trials(deepcopy=False)
        session = compute_budget.launched_here(trials, before)
        if before and (so_far := compute_budget.study_line(trials)) is not None:
            print(so_far)
        print(spend.line(session))


def selection_line(score: float, standard_error: float | None, what: str = "around the chosen epoch") -> str:
    spread = f" ± {standard_error:.2f} (standard error from the validation images)" if standard_error else ""
    return f"selection score (validation balanced accuracy {what}) {score:.2f}%{spread}"


def corrected_line(corrected: float) -> str:
    return (f"estimate for unseen images (the selection score less what choosing the best of the "
            f"study's trials adds, estimated over its folds): {corrected:.2f}%")


def best_command(path: Path, overrides: list[str], options: dict, as_json: bool) -> None:
    from hpo_peft.tracking.recovery import RUN_ID_ATTR
    from hpo_peft.tracking.run_story import OBJECTIVE_SE
    from hpo_peft.study.session import StudyLocation, best_and_corrected
    from hpo_peft.tracking.tracker import Tracker

    config = load_config(path, overrides)
    where = StudyLocation.of(config, **options)
    best, corrected = best_and_corrected(where)
    run_id = best.user_attrs.get(RUN_ID_ATTR)
    logged = {}  # the standard error, and the test score once `evaluate` has scored this trial
    if run_id:
        logged = Tracker(where.tracking_uri, experiment=where.study_name, create=False).get_run(run_id).data.metrics
    test = logged.get("test_balanced_accuracy")
    summary = {
        "trial_number": best.number,
        "params": best.params,
        "val_balanced_accuracy": best.value,
        "val_balanced_accuracy_se": logged.get(OBJECTIVE_SE),
        "val_balanced_accuracy_corrected": corrected,
        "test_balanced_accuracy": test,
        "mlflow_run_id": run_id,
        "mlflow_ui": ui_links(where, run_id),
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"best trial {best.number}: {selection_line(best.value, summary['val_balanced_accuracy_se'])}")
    if corrected is not None:
        print(corrected_line(corrected))
    error = f" ± {logged['test_standard_error']:.2f}" if "test_standard_error" in logged else ""
    print(f"test balanced accuracy: {f'{test:.2f}%{error} (validation - test gap {best.value - test:+.2f})' if test is not None else 'not evaluated yet (hpo-peft evaluate)'}")
    print(f"parameters: {best.params}")
    if config.search.ensemble > 1:
        print(f"search.ensemble={config.search.ensemble}: `evaluate` scores the study's top trials as one model")
    print(f"MLflow run: {run_id}")
    print_ui_links(where, run_id, summary["mlflow_ui"])


def evaluate_command(
    path: Path, overrides: list[str], options: dict, run_id: str | None, register: str | None, as_json: bool,
    force_alias: bool = False,
) -> dict:
    """Test-split evaluation of a trial's adapter, rebuilt from its MLflow artifacts alone. `register`:
    as a version of that model (once per run), its alias `best` moved only to a better trial unless
    `force_alias`."""
    from hpo_peft.data import load_test
    from hpo_peft.models.classifier import load_base_model
    from hpo_peft.tracking.recovery import RUN_ID_ATTR
    from hpo_peft.tracking.run_story import OBJECTIVE, OBJECTIVE_SE
    from hpo_peft.core import stores
    from hpo_peft.tracking.scoring import evaluate_run
    from hpo_peft.study.session import StudyLocation, best_and_corrected, load_study
    from hpo_peft.tracking.ensemble_run import ensemble_line, ensemble_run
    from hpo_peft.tracking.tracker import Tracker

    config = prepare_config(path, overrides)
    where = StudyLocation.of(config, **options)
    corrected, members = None, None  # only for the study's own choice
    study_choice = run_id is None
    if study_choice:
        trials = load_study(where).get_trials(deepcopy=False)  # read once: the best trial, and the ensemble's members
        best, corrected = best_and_corrected(where, trials)
        run_id = best.user_attrs.get(RUN_ID_ATTR)
        if run_id is None:
            raise UserError(f"the best trial of study {where.study_name!r} has no MLflow run")
    tracker = Tracker(where.tracking_uri, experiment=where.study_name, create=False)
    if (db := stores.sqlite_path(tracker.uri)) is not None:  # it records the test score: say so before the model loads
        stores.check_writable(db.parent, "the MLflow store", "evaluate records the test score on the trial's run "
                              "(`study best` and `predict` read a read-only store)")
    if study_choice and config.search.ensemble > 1:  # the study's choice: its top trials as one model
        built = ensemble_run(tracker, where.study_name, trials, config.search.ensemble)
        if built is not None:
            (run_id, members), corrected = built, None
    tracker.check_has_adapter(run_id)
    base = load_base_model(config.model)
    test = load_test(config.data, base.preprocessing)
    metrics, metadata = evaluate_run(tracker, run_id, base, test, config)
    logged = tracker.get_run(run_id).data.metrics
    selection, selection_se = logged.get(OBJECTIVE), logged.get(OBJECTIVE_SE)
    result = {"mlflow_run_id": run_id, "method": metadata["method"], "val_balanced_accuracy": selection,
              "val_balanced_accuracy_se": selection_se, "val_balanced_accuracy_corrected": corrected,
              **metrics.as_dict(), "mlflow_ui": ui_links(where, run_id)}
    if members:
        result.update(ensemble_trials=[t.number for t in members], members_selection=[t.value for t in members])
    from hpo_peft.tracking.pyfunc_model import log_adapter_model, register_model

    result["model_uri"] = log_adapter_model(tracker, run_id)  # the adapter as an MLflow pyfunc model
    if register:
        registered = register_model(tracker, run_id, result["model_uri"], register, force_alias=force_alias)
        result.update(registered_version=registered["version"], registered_model=register,
                      new_version=registered["new_version"], alias_moved=registered["alias_moved"],
                      alias_note=registered["note"])
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"run {run_id} ({metadata['method']['name']}): test balanced accuracy {metrics.balanced_accuracy:.2f}% "
              f"± {metrics.standard_error:.2f} (standard error, {sum(map(sum, metrics.confusion))} test images"
              f"{metrics.over_classes('the test table')})")
        if members:
            print(ensemble_line(members))
        if selection is not None:
            gap = selection - metrics.balanced_accuracy
            both = math.hypot(selection_se or 0.0, metrics.standard_error)  # the two scores' images are independent
            spread = f" ({abs(gap) / both:.1f} standard errors of the difference)" if selection_se and both else ""
            what = "of the members' mean probabilities" if members else "around the chosen epoch"
            print(f"{selection_line(selection, selection_se, what)}; validation - test gap {gap:+.2f} points{spread}")
        if corrected is not None:
            print(corrected_line(corrected) + f"; minus test {corrected - metrics.balanced_accuracy:+.2f} points")
        print(metrics.recall_line())
        print(format_confusion(metrics.confusion, config.data.categories))
        if register:
            before = "" if registered["new_version"] else " (this run was registered before: no new version)"
            alias = " (alias 'best')" if registered["alias_version"] == registered["version"] else ""
            print(f"registered as {register} version {registered['version']}{before}{alias}")
            if result["alias_note"]:
                print(result["alias_note"])
        print_ui_links(where, run_id, result["mlflow_ui"], "evaluated run")
    return result


def predict_command(model: str, images: list[str], table: Path | None, out: Path, strict: bool, batch_size: int,
                    config_path: Path | None, overrides: list[str], tracking_uri: str | None) -> dict:
    """The chosen adapter on new images: a CSV of predicted classes and probabilities, and with a
    labelled table the metrics and confusion matrix as `evaluate` prints them."""
    import torch

    from hpo_peft.fewshot import predict
    from hpo_peft.fewshot.evaluate import compute_metrics
    from hpo_peft.models.classifier import load_base_model
    from hpo_peft.tracking.pyfunc_model import adapter_label, fetch_adapter
    from hpo_peft.tracking.tracker import temporary_folder

    if batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {batch_size}")
    predict.check_out_file(out)
    if table is None and not images:
        raise UserError("IMAGES: give image files, folders or globs, or --table FILE")
    paths = predict.collect_images(images) if table is None else []  # none found: refused before any load
    config = prepare_config(config_path, overrides) if config_path is not None else None
    from hpo_peft.core.stores import default_tracking_uri  # $MLFLOW_TRACKING_URI, else mlruns/mlflow.db

    tracking_uri = tracking_uri or (config.tracking.uri if config is not None else None) or default_tracking_uri()
    label = adapter_label(model)  # errors name the model given, not the temporary download
    with temporary_folder() as tmp:
        folder = fetch_adapter(model, tracking_uri, Path(tmp))
        metadata = predict.read_metadata(folder, label)
        labels = None
        if table is not None:
            if len(images) > 1:
                raise UserError("IMAGES: with --table, give at most one folder: the one holding the table's images")
            column = config.data.image_column if config is not None else "image_name"
            label_column = config.data.label_column if config is not None else None
            paths, labels = predict.labelled_images(table, Path(images[0]) if images else None, column,
                                                    metadata["categories"], label_column)
            if paths and not any(p.is_file() for p in paths):
                raise UserError(f"--table {table}: none of its {len(paths)} images is in {paths[0].parent}")
        base = load_base_model(config.model if config is not None else predict.base_model_config(metadata))
        predictor = predict.load_predictor(folder, base, device=config.train.device if config is not None else "auto",
                                           precision=config.train.precision if config is not None else None, label=label)
    kept, logits, skipped = [], [], []
    for index, batch, bad in predict.decode_batches(paths, predictor.preprocessing, batch_size, strict):
        kept += index
        logits.append(predictor.logits(batch, batch_size))
        skipped += bad
    if not kept:
        if not paths:
            raise UserError(f"--table {table}: names no image")
        raise UserError(f"none of the {len(paths)} images could be read: first {skipped[0][0]}: {skipped[0][1]}")
    logits = torch.cat(logits)
    truth = [labels[i] for i in kept] if labels is not None else None
    frame = predict.predictions_table([str(paths[i]) for i in kept], logits, predictor.categories, truth)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    except OSError as err:
        raise UserError(f"--out {out}: cannot be written ({err.strerror or err})") from None
    print(f"{len(kept)} of {len(paths)} images predicted ({metadata['method']['name']} adapter); table in {out}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    result = {"predicted": len(kept), "skipped": [[str(p), r] for p, r in skipped], "out": str(out)}
    if truth:
        metrics = compute_metrics(logits, torch.tensor(truth), predictor.categories)
        in_table = {predictor.categories[i] for i in labels}
        where = "the table" if not set(metrics.classes_without_images) & in_table else "the images read"
        print(f"balanced accuracy {metrics.balanced_accuracy:.2f}% ± {metrics.standard_error:.2f} "
              f"(standard error, {len(kept)} images{metrics.over_classes(where)})")
        print(metrics.recall_line())
        print(format_confusion(metrics.confusion, predictor.categories))
        result["metrics"] = metrics.as_dict()
    return result


def compare_command(path: Path, overrides: list[str], options: dict, shots: list[int] | None, seeds: list[int] | None,
                    methods: list[str] | None, trials_per_method: int | None, out: Path | None) -> None:
    from hpo_peft.app.compare import run_compare
    from hpo_peft.study.preflight import check_compare_data
    from hpo_peft.study.session import StudyLocation

    given = {"shots": shots, "seeds": seeds, "methods": methods, "trials_per_method": trials_per_method}
    extra = [f"compare.{k}={json.dumps(v)}" for k, v in given.items() if v is not None]
    config = prepare_study_config(path, [*overrides, *extra])
    check_compare_data(config)
    where = StudyLocation.of(config, **options)
    out = out or Path("results") / f"{where.study_name}-compare"
    table = run_compare(config, where, out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"table, per-run CSV and plot in {out}")


def ui_links(where, run_id: str | None) -> dict[str, str]:
    """The MLflow UI's run table (sorted by the objective) and the run's page (ui_links.py)."""
    from hpo_peft.tracking.ui_links import study_links

    return study_links(where.tracking_uri, where.study_name, run_id)


def print_ui_links(where, run_id: str | None, links: dict[str, str] | None = None, label: str = "best run") -> None:
    from hpo_peft.tracking.ui_links import print_links

    print_links(links or ui_links(where, run_id), label)
