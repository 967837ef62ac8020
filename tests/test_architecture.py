"""The arrows that must never exist (CONTRIBUTING.md, "Layout"), checked on the source."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpo_peft"
# the sub-packages from the bottom up: a module imports from its own floor and the floors below, never above
FLOORS = {"core": 0, "data": 1, "demo_kit": 1, "models": 2, "methods": 3, "fewshot": 4, "tracking": 5, "study": 6, "app": 7}
BRICKS = ["core", "data", "demo_kit", "models", "methods", "fewshot"]  # a few-shot trial without Optuna or MLflow
STORES = PACKAGE / "core" / "stores.py"  # the one brick that opens Optuna's and MLflow's stores (locks, URLs)
MAX_LINES = 420  # "about 400": one idea per file


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "hpo_peft":  # `from hpo_peft import fewshot`: the names are sub-packages
                names |= {f"hpo_peft.{alias.name}" for alias in node.names}
    return names


def sub_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "hpo_peft" and len(parts) > 1 and parts[1] in FLOORS else None


def package_files(name: str) -> list[Path]:
    return sorted((PACKAGE / name).glob("*.py"))


def test_the_package_is_its_sub_packages_and_each_states_its_face():
    """No loose modules beside the sub-packages; each `__init__` says what it holds and lists its face."""
    assert {p.stem for p in PACKAGE.glob("*.py")} <= {"__init__", "__main__"}, "a module outside the sub-packages"
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(FLOORS), f"sub-packages {sorted(folders)} differ from the floors {sorted(FLOORS)}"
    for name in FLOORS:
        package = importlib.import_module(f"hpo_peft.{name}")
        assert package.__doc__ and len(package.__doc__.split()) >= 8, f"hpo_peft/{name}/__init__.py states no face"
        assert package.__all__, f"hpo_peft/{name} has no __all__"


def test_no_arrow_points_up_a_floor():
    for name, floor in FLOORS.items():
        for path in package_files(name):
            above = {m for m in imports_of(path) if (sub := sub_package(m)) and FLOORS[sub] > floor}
            assert not above, f"{path.relative_to(PACKAGE)} (floor {floor}) imports {above} from a floor above"


def test_bricks_never_import_optuna_or_mlflow():
    for name in BRICKS:
        for path in package_files(name):
            if path == STORES:
                continue
            bad = {m for m in imports_of(path) if m.split(".")[0] in {"optuna", "mlflow"}}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_config_knows_nothing_of_torch():
    for name in ("config.py", "config_file.py", "data_config.py"):
        path = PACKAGE / "core" / name
        assert not {m for m in imports_of(path) if m.split(".")[0] in {"torch", "optuna", "mlflow"}}, name


def test_nothing_imports_the_cli():
    for path in PACKAGE.rglob("*.py"):
        assert "hpo_peft.app.cli" not in imports_of(path) or path.name == "__main__.py", path


def test_every_sub_package_is_in_the_table_and_stays_small():
    """CONTRIBUTING.md's package table names every sub-package and module; no module grows past about 400 lines."""
    layout = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    for name in FLOORS:
        assert f"`{name}/`" in layout, f"`{name}/` missing from CONTRIBUTING.md's package table"
        for path in package_files(name):
            assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines"
            if path.stem != "__init__" and name not in ("data", "demo_kit", "models", "methods"):
                assert f"`{path.name}`" in layout, f"`{name}/{path.name}` missing from CONTRIBUTING.md's package table"


def test_the_demo_kit_imports_only_config_and_errors_from_the_package():
    for path in package_files("demo_kit"):
        ours = {m for m in imports_of(path) if m.startswith("hpo_peft")}
        assert ours <= {"hpo_peft.core.config", "hpo_peft.core.errors", "hpo_peft.demo_kit"} | {
            f"hpo_peft.demo_kit.{p.stem}" for p in package_files("demo_kit")}, (path, ours)


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


def test_no_scheme_name_comparisons_outside_the_schemes():
    """No `if scheme == "kfold"`: what differs per validation scheme lives in its object
    (`fewshot/validation.py`); the config's own checks of `data.validation` are the one other place."""
    allowed = {PACKAGE / "fewshot" / "validation.py", PACKAGE / "core" / "data_config.py"}
    for path in PACKAGE.rglob("*.py"):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if {"holdout", "kfold", "fixed"} & set(constants):
                    pytest.fail(f"{path.relative_to(PACKAGE)}:{node.lineno} compares against a scheme name")
