"""The README's MLflow UI screenshots, taken from a real browser over a small demo study.

    .venv/bin/python docs/screenshots.py            # writes docs/mlflow_run_table.png, docs/mlflow_trial.png

It builds the demo kit (or reuses it) under a temporary folder, runs a 10-trial study on it,
evaluates the best trial, starts `mlflow ui` on loopback over the study's store and opens the links
that `hpo-peft study best` prints in headless Chromium (Debian's `chromium`, driven by
`playwright` without downloading a browser). tests/tracking/test_ui.py uses the same helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("HPO_PEFT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_NAME = re.compile(r"t\d{3} [^|]*|[\w.-]+ session \d+[^|]*")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ui(tracking_uri: str, workdir: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` on a free loopback port over the store; returns once it answers."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    log = open(workdir / "mlflow_ui.log", "wb")
    process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow ui exited ({process.returncode}); see {workdir / 'mlflow_ui.log'}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
                if answer.status == 200:
                    return process, base
        except OSError:
            time.sleep(0.5)
    stop_ui(process)
    raise RuntimeError(f"mlflow ui did not answer within {timeout:.0f}s; see {workdir / 'mlflow_ui.log'}")


def stop_ui(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and its worker
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def browse(url: str, screenshot: Path, wait_for: str, size: tuple[int, int] = (1400, 620),
           timeout_ms: int = 120_000) -> list[str]:
    """Open `url` in headless Chromium, wait until `wait_for` is shown, save a screenshot and return
    the run names of the run table's rows in display order (empty on a run's page)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="hpo_peft_chromium_") as profile, sync_playwright() as driver:
        browser = driver.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": size[0], "height": size[1]})
        try:
            page = browser.new_page()
            page.goto(url)
            page.get_by_text(wait_for).first.wait_for(timeout=timeout_ms)
            close = page.get_by_role("button", name="Close")  # the assistant's side panel, if open
            if close.count():
                close.first.click()
            page.wait_for_timeout(1000)  # let the grid settle after the panel closes (not a condition we can name)
            rows = page.eval_on_selector_all(
                "[role=row][row-index]", "els => els.map(e => [Number(e.getAttribute('row-index')), e.innerText])")
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    names: dict[int, str] = {}
    for index, text in rows:
        found = RUN_NAME.search(" | ".join(text.splitlines()))
        if found and index not in names:
            names[index] = found.group(0).strip()
    return [names[i] for i in sorted(names)]


def demo_study(workdir: Path, n_trials: int = 10) -> dict:
    """A small demo study and its evaluated best trial; returns the CLI options used."""
    from hpo_peft.app.cli import main

    options = ["--study-name", "demo", "--storage", str(workdir / "optuna.journal"),
               "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    kit = ["--set", f"demo_kit={workdir / 'kit'}", "--set", f"data.root={workdir / 'kit/sicapv2'}",
           "--set", f"model.name_or_path={workdir / 'kit/model'}"]
    config = str(ROOT / "studies" / "demo.yaml")
    assert main(["study", "run", config, *kit, *options, "--n-trials", str(n_trials)]) == 0
    assert main(["evaluate", config, *kit, *options]) == 0
    return {"config": config, "options": options, "kit": kit}


def best_links(config: str, options: list[str], ui_base: str) -> dict:
    """What `hpo-peft study best --json` prints, asked through the UI's own server."""
    import contextlib
    import io
    import json

    from hpo_peft.app.cli import main

    served = [*options[:-1], ui_base]  # --tracking-uri: the running server
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["study", "best", config, *served, "--json"]) == 0
    return json.loads(out.getvalue())


def shrink(path: Path) -> None:
    """A 256-colour palette: the README's PNGs stay small."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    workdir = Path(tempfile.mkdtemp(prefix="hpo_peft_screens_"))
    try:
        study = demo_study(workdir)
        process, base = start_ui(study["options"][-1], workdir)
        try:
            best = best_links(study["config"], study["options"], base)
            names = browse(best["mlflow_ui"]["run_table"], ROOT / "docs" / "mlflow_run_table.png", "t00")
            print("run table:", names)
            browse(best["mlflow_ui"]["best_run"], ROOT / "docs" / "mlflow_trial.png", "Description",
                   size=(1400, 1400))
        finally:
            stop_ui(process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name in ("mlflow_run_table.png", "mlflow_trial.png"):
        shrink(ROOT / "docs" / name)
    print("wrote docs/mlflow_run_table.png and docs/mlflow_trial.png")


if __name__ == "__main__":
    main()
