"""Command line: argument parsing and friendly errors. Holds no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpo_peft.errors import UserError


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="study YAML, e.g. studies/demo.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.learning_rate=0.01 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpo-peft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    kit = commands.add_parser("demo-kit", help="write the offline demo dataset and model")
    kit.add_argument("--out", type=Path, default=None, help="folder (default local_data/demo)")
    kit.add_argument("--force", action="store_true", help="rebuild even if present")

    trial = commands.add_parser("trial", help="train and evaluate one method with fixed hyper-parameters")
    _add_config(trial)
    trial.add_argument("--method", default=None, help="method name (default: the config's method.name)")
    trial.add_argument("--save", type=Path, default=None, help="write the trained adapter to this folder")
    trial.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo-kit":
            from hpo_peft.demo_kit import DEFAULT_DIR, build_demo_kit

            print(build_demo_kit(args.out or DEFAULT_DIR))
        elif args.command == "trial":
            from hpo_peft.commands import run_single_trial

            run_single_trial(args.config, args.overrides, args.method, args.save, args.json)
    except UserError as err:
        print(f"hpo-peft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hpo-peft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
