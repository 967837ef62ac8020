"""The arrows that must never exist (CONTRIBUTING.md, "Layout"), checked on the source."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpo_peft"
BRICKS = ["data", "data_config", "model", "train", "evaluate", "features", "artifacts", "trial", "config", "config_file",
          "demo_kit", "errors", "runtime", "validation", "course", "identity", "predict", "models"]
# the study's own rooms: Optuna and MLflow, but never the layers that call the study
STUDY_ROOMS = ["search_space", "tracking", "recovery", "samplers", "stores", "run_record", "selection", "scoring",
               "interrupts", "preflight", "run_story", "ui_links", "pyfunc_model", "retention", "budget",
               "compute_budget", "portfolio"]
PACKAGES = ("methods", "demo_kit", "models", "data")
MAX_LINES = 420  # "about 400": one idea per file


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def module_files(name: str) -> list[Path]:
    if (PACKAGE / name).is_dir():
        return sorted((PACKAGE / name).glob("*.py"))
    return [PACKAGE / f"{name}.py"]


def test_bricks_never_import_optuna_or_mlflow():
    for name in [*BRICKS, "methods"]:
        for path in module_files(name):
            bad = {m for m in imports_of(path) if m.split(".")[0] in {"optuna", "mlflow"}}
            assert not bad, f"{path.name} imports {bad}"


def test_config_knows_nothing_of_torch():
    for name in ("config.py", "config_file.py", "data_config.py"):
        assert not {m for m in imports_of(PACKAGE / name) if m.split(".")[0] in {"torch", "optuna", "mlflow"}}, name


def test_nothing_imports_the_cli_and_nothing_below_the_study_imports_it():
    for path in PACKAGE.rglob("*.py"):
        imported = imports_of(path)
        assert "hpo_peft.cli" not in imported or path.name == "__main__.py", path
        if path.stem in [*BRICKS, *STUDY_ROOMS] or path.parent.name in PACKAGES:
            assert not imported & {"hpo_peft.study", "hpo_peft.commands", "hpo_peft.compare"}, path


def test_every_room_exists_and_stays_small():
    """CONTRIBUTING.md's package table and the files agree; no module grows past about 400 lines."""
    layout = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    for name in [*BRICKS, *STUDY_ROOMS, "study", "compare", "commands", "cli"]:
        for path in module_files(name):
            assert path.is_file(), path
            assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines"
        listed = f"`{name}/`" if (PACKAGE / name).is_dir() else f"`{name}.py`"
        assert listed in layout, f"{listed} missing from CONTRIBUTING.md's package table"
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= {*BRICKS, *STUDY_ROOMS, "study", "compare", "commands", "cli"}, "a module the test does not know"


def test_the_demo_kit_imports_only_config_and_errors_from_the_package():
    for path in module_files("demo_kit"):
        ours = {m for m in imports_of(path) if m.startswith("hpo_peft")}
        assert ours <= {"hpo_peft.config", "hpo_peft.errors", "hpo_peft.demo_kit"} | {
            f"hpo_peft.demo_kit.{p.stem}" for p in module_files("demo_kit")}, (path, ours)


def compared_constants(names: set[str], outside: str):
    """(file, line) of each comparison with one of `names` in the package, but for the `outside` room."""
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == outside:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if names & set(constants):
                    yield path, node.lineno


def test_no_method_name_comparisons_outside_the_methods():
    """No `if method == "lora"` chains: behaviour that differs per method lives in its own file."""
    names = {"zero_shot", "affine_ln", "bias", "lora", "full", "linear_probe", "zs_linear_probe", "clip_adapter", "clap",
             "tip_adapter", "tip_adapter_f", "coop", "kgcoop"}
    for path, line in compared_constants(names, outside="methods"):
        pytest.fail(f"{path.name}:{line} compares against a method name")


def test_no_family_name_comparisons_outside_the_model_room():
    """No `if family == "open_clip"`: what differs per model family lives in `hpo_peft/models/`."""
    names = {"hf_clip", "open_clip", "conch"}
    for path, line in compared_constants(names, outside="models"):
        pytest.fail(f"{path.name}:{line} compares against a family name")
