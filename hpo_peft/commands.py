"""What each CLI command does, in the order a user would expect: validate the config, make the
demo kit if the config asks for it, then the work, then a readable report."""

from __future__ import annotations

import json
from pathlib import Path

from hpo_peft.config import StudyConfig, load_config
from hpo_peft.errors import UserError


def prepare_config(path: Path, overrides: list[str], method: str | None = None) -> StudyConfig:
    """Load and fully validate a config (method names and options included) before any model loads."""
    from hpo_peft.methods import get_method, method_config

    config = load_config(path, overrides)
    if method is not None:
        config.method.name = method
    get_method(config.method.name, key="method.name")
    for name, options in config.methods.items():
        method_config(name, options, key="methods")
    if config.demo_kit is not None:
        from hpo_peft.demo_kit import build_demo_kit

        build_demo_kit(config.demo_kit)
    return config


def format_confusion(confusion: list[list[int]], categories: list[str]) -> str:
    width = max(6, *(len(c) + 1 for c in categories))
    lines = ["true\\pred".ljust(10) + "".join(c.rjust(width) for c in categories)]
    for category, row in zip(categories, confusion):
        lines.append(category.ljust(10) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def run_single_trial(path: Path, overrides: list[str], method: str | None, save: Path | None, as_json: bool) -> None:
    from hpo_peft.artifacts import save_adapter
    from hpo_peft.data import load_test
    from hpo_peft.evaluate import evaluate
    from hpo_peft.train import amp_dtype
    from hpo_peft.trial import open_workspace, run_trial

    config = prepare_config(path, overrides, method)
    if save is not None and save.exists() and any(save.iterdir()):
        raise UserError(f"{save}: adapter folder exists and is not empty")
    workspace = open_workspace(config)
    name = config.method.name
    if not as_json:
        print(f"method {name}; model {config.model.name_or_path}; {config.data.shots} shots/class, seed {config.data.seed}")

    def report(epoch):
        if not as_json:
            print(
                f"epoch {epoch.epoch:3d}  train loss {epoch.train_loss:.4f}  val loss {epoch.val_loss:.4f}  "
                f"val balanced acc {epoch.val_balanced_accuracy:.2f}%"
            )

    outcome = run_trial(workspace, name, config.methods.get(name, {}), config.train, on_epoch=report)
    device = next(outcome.classifier.parameters()).device
    test = evaluate(
        outcome.classifier, load_test(config.data, workspace.base.preprocessing), workspace.base.preprocessing,
        config.data.categories, config.train.eval_batch_size, amp_dtype(config.train.precision, device),
    )
    if save is not None:
        save_adapter(
            save, outcome.classifier, workspace.base, name, outcome.method_options,
            config.data.categories, config.prompts.model_dump(),
        )
    best = outcome.training.best
    if as_json:
        print(json.dumps({
            "method": name,
            "method_config": outcome.method_options,
            "trainable_parameters": outcome.trainable_parameters,
            "training": outcome.training.as_dict(),
            "validation": outcome.validation.as_dict(),
            "test": test.as_dict(),
        }, indent=2))
        return
    print(f"trainable parameters: {outcome.trainable_parameters:,}")
    if best is not None:
        print(f"best epoch {best.epoch} (early stop: {outcome.training.stopped_early})")
    print(f"validation balanced accuracy: {outcome.validation.balanced_accuracy:.2f}%")
    print(f"test balanced accuracy: {test.balanced_accuracy:.2f}%")
    print("test confusion matrix (rows true, columns predicted):")
    print(format_confusion(test.confusion, config.data.categories))
    if save is not None:
        print(f"adapter saved to {save}")
