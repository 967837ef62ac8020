"""Command line: argument parsing and friendly errors. Holds no logic of its own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpo_peft import __version__
from hpo_peft.core import interrupts
from hpo_peft.core.errors import UserError
from hpo_peft.core.stores import disk_full


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="study YAML, e.g. studies/demo.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.learning_rate=0.01 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpo-peft",
        description="Find the best way to adapt a CLIP-format vision-language model (PLIP) to a few-shot task.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    kit = commands.add_parser("demo-kit", help="write the offline demo dataset and model")
    kit.set_defaults(handler=_demo_kit)
    kit.add_argument("--out", type=Path, default=None, help="folder (default local_data/demo)")
    kit.add_argument("--force", action="store_true", help="rebuild even if present")

    trial = commands.add_parser("trial", help="train and evaluate one method with fixed hyper-parameters")
    trial.set_defaults(handler=_trial)
    _add_config(trial)
    trial.add_argument("--method", default=None, help="method name (default: the config's method.name)")
    trial.add_argument("--save", type=Path, default=None, help="write the trained adapter to this folder")
    trial.add_argument("--json", action="store_true", help="print the results as JSON")

    study = commands.add_parser("study", help="hyper-parameter studies").add_subparsers(dest="study_command", required=True)
    run = study.add_parser("run", help="run (or continue) a study")
    run.set_defaults(handler=_study_run)
    _add_config(run)
    _add_study_options(run)
    run.add_argument("--n-trials", type=int, default=None, help="trials to run in this session (default: search.n_trials)")
    run.add_argument("--timeout", type=float, default=None, help="stop starting new trials after this many seconds")
    run.add_argument("--budget", default=None, metavar="300e|20m|90s",
                     help="stop starting new trials once this session's trials trained that many epochs (folds and "
                          "refits included) or for that long (default: search.budget); search.n_trials then does not apply")
    run.add_argument("--jobs", type=int, default=1, help="worker processes on the same storage (default 1)")
    run.add_argument("--accept-changes", action="store_true",
                     help="continue an existing study although settings that define it changed")
    worker = study.add_parser("worker", help="one worker of many (a job array): trials until the study's total is reached")
    worker.set_defaults(handler=_study_worker)
    _add_config(worker)
    _add_study_options(worker)
    worker.add_argument("--n-trials", type=int, default=None,
                        help="the study's total over all workers (default: search.n_trials); exits 0 once used up")
    worker.add_argument("--timeout", type=float, default=None, help="stop starting new trials after this many seconds")
    worker.add_argument("--accept-changes", action="store_true",
                        help="continue an existing study although settings that define it changed")
    best = study.add_parser("best", help="the best trial so far")
    best.set_defaults(handler=_study_best)
    _add_config(best)
    _add_study_options(best)
    best.add_argument("--json", action="store_true")

    evaluate = commands.add_parser("evaluate", help="evaluate the best (or a given) trial's adapter on the test split")
    evaluate.set_defaults(handler=_evaluate)
    _add_config(evaluate)
    _add_study_options(evaluate)
    evaluate.add_argument("--run-id", default=None, help="MLflow run id of a trial (default: the study's best)")
    evaluate.add_argument("--register", default=None, metavar="NAME", help="register the adapter in the MLflow model registry "
                          "(once per run); its alias 'best' moves to it only if its selection score is better")
    evaluate.add_argument("--force-alias", action="store_true", help="with --register: move alias 'best' to this "
                          "trial even if the one it points at scored better")
    evaluate.add_argument("--json", action="store_true")

    predict = commands.add_parser("predict", help="the chosen adapter on new images: classes and probabilities as CSV")
    predict.set_defaults(handler=_predict)
    predict.add_argument("model", help="MLflow run id of a trial, models:/NAME@ALIAS, or an adapter folder")
    predict.add_argument("images", nargs="*", help="image files, folders or globs (JPEG, PNG, TIFF); with --table, "
                         "the folder of the table's images (default: the SICAPv2 layout's images/)")
    predict.add_argument("--table", type=Path, default=None, help="a SICAPv2-style table: its images, with labels")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV (default predictions.csv)")
    predict.add_argument("--strict", action="store_true", help="stop at the first unreadable image (exit 2)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    predict.add_argument("--config", type=Path, default=None,
                         help="a study YAML: its tracking store, base model location, device and precision")
    predict.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    predict.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the config's, "
                         "else $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")

    compare = commands.add_parser("compare", help="methods x shots x seeds: select on validation, score on test")
    compare.set_defaults(handler=_compare)
    _add_config(compare)
    _add_study_options(compare)
    compare.add_argument("--shots", type=int, nargs="+", default=None, help="e.g. 1 2 4 8 16")
    compare.add_argument("--seeds", type=int, nargs="+", default=None, help="sampling seeds, e.g. 1 2 3")
    compare.add_argument("--methods", nargs="+", default=None, help="default: compare.methods in the config")
    compare.add_argument("--trials-per-method", type=int, default=None)
    compare.add_argument("--out", type=Path, default=None, help="folder for the CSV tables and plot (default results/NAME-compare)")
    return parser


def _add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study-name", default=None, help="default: the config's name")
    parser.add_argument("--storage", default=None, help="Optuna storage URL or .journal file (default: $OPTUNA_STORAGE, "
                        "else mlruns/optuna.journal)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the config's tracking.uri, "
                        "else $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")


def _study_options(args: argparse.Namespace) -> dict:
    return {"study_name": args.study_name, "storage": args.storage, "tracking_uri": args.tracking_uri}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with interrupts.handled():  # SIGTERM and Ctrl-C end a command the same way
        return _dispatch(args)


def _demo_kit(args: argparse.Namespace) -> None:
    from hpo_peft.demo_kit import DEFAULT_DIR, build_demo_kit

    print(build_demo_kit(args.out or DEFAULT_DIR, force=args.force))


def _trial(args: argparse.Namespace) -> None:
    from hpo_peft.app.commands import run_single_trial

    run_single_trial(args.config, args.overrides, method=args.method, save=args.save, as_json=args.json)


def _study_run(args: argparse.Namespace) -> None:
    from hpo_peft.app.commands import run_study_command

    run_study_command(args.config, args.overrides, _study_options(args), n_trials=args.n_trials, timeout=args.timeout,
                      jobs=args.jobs, accept_changes=args.accept_changes, budget=args.budget)


def _study_worker(args: argparse.Namespace) -> None:
    from hpo_peft.app.commands import run_study_command

    run_study_command(args.config, args.overrides, _study_options(args), n_trials=args.n_trials, timeout=args.timeout,
                      accept_changes=args.accept_changes, total=True)


def _study_best(args: argparse.Namespace) -> None:
    from hpo_peft.app.commands import best_command

    best_command(args.config, args.overrides, _study_options(args), as_json=args.json)


def _evaluate(args: argparse.Namespace) -> None:
    from hpo_peft.app.commands import evaluate_command

    if args.force_alias and not args.register:
        raise UserError("--force-alias: only with --register NAME")
    evaluate_command(args.config, args.overrides, _study_options(args), run_id=args.run_id, register=args.register,
                     as_json=args.json, force_alias=args.force_alias)


def _predict(args: argparse.Namespace) -> None:
    from hpo_peft.app.commands import predict_command

    predict_command(args.model, args.images, table=args.table, out=args.out, strict=args.strict,
                    batch_size=args.batch_size, config_path=args.config, overrides=args.overrides,
                    tracking_uri=args.tracking_uri)


def _compare(args: argparse.Namespace) -> None:
    from hpo_peft.app.commands import compare_command

    compare_command(args.config, args.overrides, _study_options(args), shots=args.shots, seeds=args.seeds,
                    methods=args.methods, trials_per_method=args.trials_per_method, out=args.out)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        args.handler(args)
    except UserError as err:
        print(f"hpo-peft: error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:  # e.g. a read-only folder the checks could not foresee
        print(f"hpo-peft: error: {err.filename or ''}: permission denied ({err.strerror}); "
              "run from a writable folder or point --storage/--tracking-uri elsewhere", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"hpo-peft: {interrupts.reason(err)}; runs closed", file=sys.stderr)
        return interrupts.exit_code(err)
    except Exception as err:  # a full disk, wherever it struck, is one line too
        if (full := disk_full(err)) is None:
            raise
        print(f"hpo-peft: error: disk full ({full}); free some space and run the command again", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
