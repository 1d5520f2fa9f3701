"""The MLflow UI as a user sees it: `python -m harness.ui mlflow` over a store filled by a tiny real sweep, driven
in headless Debian chromium by Playwright: runs page -> the cell's run (by name) -> its metrics, with screenshots."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_JOB, run_harness
from mlflow.tracking import MlflowClient

from harness.ui import stop_process_group

CHROMIUM = Path("/usr/bin/chromium")
# These flags let Debian's chromium run headless in a container (Playwright's own browser download fails here).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STUDY = "grpo-vs-cfpo/proxy-full"
RUN_NAME = "cfpo-br2-it1-s0"
# One cell of the repo's sweep on the conftest's tiny job: its proxy (built once per session, shared with the
# job tests) is warm-started until some answers are right, so the reward, ratio and gradient curves move.
CELL = ["objective=cfpo", "batch_ratio=2", "iterations=1", "seed=0", *TINY_JOB]
# Shown on the run's page: the table on Overview, a chart per metric on Model metrics.
SHOWN = ("reward", "val/reward", "clip_ratio/region_mean", "ratio/abs_dev_mean", "grad_norm")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing: `apt-get install chromium` (.ci/run "
                                                      "installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000, (path, len(data))


def test_mlflow_ui_shows_a_cell_runs_metrics(harness_env, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install playwright")
    # The default store (results/mlflow.db under $HARNESS_RESULTS), as `just ui` sees it with no env set.
    env = dict(harness_env)
    env.pop("MLFLOW_TRACKING_URI")
    env.pop("HARNESS_TRAIN_CMD", None)
    sets = [a for s in CELL for a in ("--set", s)]
    sweep = run_harness(["sweep", "grpo-vs-cfpo", "--scale", "proxy-full", "--workers", "1", *sets], env, timeout=300)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    store = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = store.get_experiment_by_name(STUDY)
    [run] = [r for r in store.search_runs([exp.experiment_id]) if r.info.run_name == RUN_NAME]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        ui = subprocess.Popen([sys.executable, "-m", "harness.ui", "mlflow", "--port", str(port)], cwd=tmp_path,
                              env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while f"{base}/#/experiments" not in log.read_text():
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1200})
                page.set_default_timeout(60_000)
                page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs")
                # The cell's run is nested under the sweep's parent run, collapsed: expand the parent's row.
                parent = page.get_by_role("link", name=f"sweep {STUDY}")
                parent.first.wait_for()
                assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
                if assistant.count():  # MLflow 3's chat side panel: closed for room in the screenshots
                    assistant.first.click()
                cell = page.get_by_role("link", name=RUN_NAME, exact=True)
                if not cell.is_visible():
                    page.get_by_role("row").filter(has=parent).locator('[col-id*="Run Name"] button').first.click()
                cell.wait_for()
                page.screenshot(path=tmp_path / "runs.png")
                cell.click()
                page.wait_for_url(re.compile(rf".*/runs/{run.info.run_id}.*"))

                # Overview: the metrics table lists every metric the run logged.
                table = page.get_by_text(f"Metrics ({len(run.data.metrics)})", exact=True)
                table.wait_for()
                for key in SHOWN:
                    assert page.get_by_text(key, exact=True).count() >= 1, key
                table.scroll_into_view_if_needed()
                page.screenshot(path=tmp_path / "run-overview.png")

                # Model metrics: one chart per metric, its legend naming the run and the metric. Charts are drawn
                # only when scrolled into view: filter them down to the one looked for.
                page.get_by_role("tab", name="Model metrics").click()
                page.wait_for_url(re.compile(r".*/model-metrics.*"))
                search = page.get_by_placeholder("Search metric charts")
                for key in ("val/reward", "reward", "clip_ratio/region_mean"):
                    search.fill(key)
                    page.get_by_text(f"{RUN_NAME} ({key})", exact=True).first.wait_for()
                # The off-policy diagnostics (clip_ratio/*, ratio/*), scrolled to the importance-ratio charts.
                search.fill("ratio/")
                page.get_by_text("abs_dev_mean", exact=True).first.evaluate("e => e.scrollIntoView({block: 'center'})")
                page.get_by_text(f"{RUN_NAME} (ratio/abs_dev_mean)", exact=True).first.wait_for()
                page.screenshot(path=tmp_path / "run-metrics.png")
            finally:
                browser.close()
    finally:
        stop_process_group(ui, grace=30)
    for name in ("runs.png", "run-overview.png", "run-metrics.png"):
        assert_png(tmp_path / name)
    print(f"screenshots in {tmp_path}")
