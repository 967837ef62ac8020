"""The arrows that must never exist (DESIGN.md), checked on the source."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpo_peft"
BRICKS = ["data", "model", "train", "evaluate", "features", "artifacts", "trial", "config", "demo_kit", "errors"]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def module_files(name: str) -> list[Path]:
    if name == "methods":
        return sorted((PACKAGE / "methods").glob("*.py"))
    return [PACKAGE / f"{name}.py"]


def test_bricks_never_import_optuna_or_mlflow():
    for name in [*BRICKS, "methods"]:
        for path in module_files(name):
            bad = {m for m in imports_of(path) if m.split(".")[0] in {"optuna", "mlflow"}}
            assert not bad, f"{path.name} imports {bad}"


def test_config_knows_nothing_of_torch():
    assert not {m for m in imports_of(PACKAGE / "config.py") if m.split(".")[0] in {"torch", "optuna", "mlflow"}}


def test_nothing_imports_the_cli_and_nothing_below_the_study_imports_it():
    for path in PACKAGE.rglob("*.py"):
        imported = imports_of(path)
        assert "hpo_peft.cli" not in imported or path.name == "__main__.py", path
        if path.stem in [*BRICKS, "search_space", "tracking", "recovery"] or path.parent.name == "methods":
            assert not imported & {"hpo_peft.study", "hpo_peft.commands", "hpo_peft.compare"}, path


def test_no_method_name_comparisons_outside_the_methods():
    """No `if method == "lora"` chains: behaviour that differs per method lives in its own file."""
    names = {"zero_shot", "affine_ln", "bias", "lora", "full", "linear_probe", "zs_linear_probe", "clip_adapter", "clap"}
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not names & set(constants), f"{path.name}:{node.lineno} compares against a method name"
