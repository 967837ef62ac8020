"""`make test` sets itself up: scripts/system-deps.sh installs PostgreSQL, SLURM and Chromium with
apt-get when they are missing and the user may (root, or sudo without a password), and otherwise
stops in one line naming what to install. Run against an empty system root and fake id/sudo/apt-get."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system-deps.sh"
PACKAGES = "postgresql slurm-wlm munge chromium"


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run(tmp_path: Path, uid: int, sudo_ok: bool, root: Path) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake(bin_dir, "id", f"echo {uid}")
    fake(bin_dir, "sudo", 'if [ "$1" = -n ]; then shift; fi; ' + ('exec "$@"' if sudo_ok else "exit 1"))
    fake(bin_dir, "apt-get", f'echo "$*" >> {tmp_path / "apt.log"}')
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "SYSDEPS_ROOT": str(root)}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_a_user_without_sudo_is_told_in_one_line_what_to_install(tmp_path):
    result = run(tmp_path, uid=1000, sudo_ok=False, root=tmp_path / "empty")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"missing {PACKAGES}" in lines[0] and f"sudo apt-get update && sudo apt-get install -y {PACKAGES}" in lines[0]
    assert not (tmp_path / "apt.log").exists()


@pytest.mark.parametrize("uid, sudo_ok", [(0, False), (1000, True)], ids=["root", "sudo"])
def test_root_or_sudo_installs_what_is_missing(tmp_path, uid, sudo_ok):
    result = run(tmp_path, uid=uid, sudo_ok=sudo_ok, root=tmp_path / "empty")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq", f"install -y -qq {PACKAGES}"]


def test_nothing_is_installed_when_all_is_there(tmp_path):
    root = tmp_path / "system"
    for program in ("usr/lib/postgresql/15/bin/initdb", "usr/sbin/slurmctld", "usr/sbin/munged", "usr/bin/chromium"):
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_text("")
        (root / program).chmod(0o755)
    result = run(tmp_path, uid=1000, sudo_ok=False, root=root)
    assert (result.returncode, result.stderr) == (0, "")
    (root / "usr/bin/chromium").unlink()
    result = run(tmp_path, uid=1000, sudo_ok=False, root=root)
    assert result.returncode == 1 and "missing chromium:" in result.stderr
