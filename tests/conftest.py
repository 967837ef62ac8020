"""One demo kit per test session, and configs that point at it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_kit(tmp_path_factory) -> Path:
    from hpo_peft.demo_kit import build_demo_kit

    return build_demo_kit(tmp_path_factory.mktemp("kit") / "demo", progress=False)


def demo_config_dict(kit: Path) -> dict:
    """studies/demo.yaml, pointed at the session's kit."""
    raw = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    raw["demo_kit"] = None
    raw["data"]["root"] = str(kit / "sicapv2")
    raw["model"]["name_or_path"] = str(kit / "model")
    return raw


@pytest.fixture
def write_config(demo_kit, tmp_path):
    """write_config(**sections) -> path of a demo config with those top-level sections replaced/merged."""

    def write(name: str = "config.yaml", **changes) -> Path:
        raw = demo_config_dict(demo_kit)
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture(scope="session")
def demo_workspace(demo_kit):
    from hpo_peft.config import StudyConfig
    from hpo_peft.trial import open_workspace

    return open_workspace(StudyConfig.model_validate(demo_config_dict(demo_kit)))
