"""What a user sees first in the MLflow UI after a run, checked in a real browser: headless
Chromium (Debian's package) opens the pipeline's parent run and the registered version
served by ``mlflow server`` on loopback, and the page text, after its scripts ran, holds
the outcome (which model, the champion or not) and the gate's table. Screenshots of both
pages are kept under build/test-artifacts/ (or $KDPIPE_TEST_ARTIFACTS)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_stack import _wait, answers_health, free_port, stop
from typer.testing import CliRunner

from kdpipe.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.browser]
ARTIFACTS = Path(os.environ.get("KDPIPE_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "build/test-artifacts"))


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have a browser for the MLflow UI test: apt-get install chromium")
        pytest.skip("chromium not found: apt-get install chromium")
    return found


def browse(browser: str, url: str, screenshot: Path) -> str:
    """The page's text once its scripts ran (a virtual-time budget lets the UI fetch and
    render), and a screenshot of it."""
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--window-size=1400,1100", "--virtual-time-budget=20000"]
    done = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True,
                   timeout=180, check=True)
    page = re.sub(r"<(style|script)\b.*?</\1>", " ", done.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def test_the_first_run_a_user_clicks_says_which_model_won_and_why(
        tmp_path, monkeypatch, tiny_bert, separable_csv):
    import mlflow

    browser = chromium()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(app, [
        "run", "-S", f"teacher.checkpoint={tiny_bert}", "-S", f"data.source={separable_csv}",
        "-S", f"work_dir={tmp_path / 'work'}", "-S", f"tracking.uri={store}"])
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("kdpipe")
    parent = next(r for r in client.search_runs([experiment.experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)

    port, log = free_port(), tmp_path / "ui.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}/#"  # the UI routes in the URL's fragment
    try:
        _wait(lambda: answers_health(f"http://127.0.0.1:{port}"), "mlflow server", log, server)
        # The link `kdpipe run` printed, on this server's port.
        link = re.search(r"open (http://127\.0\.0\.1:5000/#\S+)", result.output.replace(
            "\n", "")).group(1).replace(":5000/", f":{port}/")
        assert f"/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}?" in link
        run_page = browse(browser, link, ARTIFACTS / "mlflow_ui_run.png")
        model_page = browse(browser, f"{base}/models/kdpipe-student/versions/1",
                            ARTIFACTS / "mlflow_ui_model_version.png")
    finally:
        stop(server)

    # The run, in the model-training view (the GenAI view lists "Evaluation runs"): named
    # for its outcome, its description the headline and the gate's table.
    assert "bilstm · reviews · v1 champion" in run_page, run_page[:3000]
    assert "Model registry" in run_page and "Evaluation runs" not in run_page
    assert "v1 is the champion" in run_page and "the gate passed every check" in run_page
    for shown in ("retention", "gate check", "min_teacher_retention", "95.00%",
                  "max_regression", "no champion yet"):
        assert shown in run_page, shown
    # The registered version: its model card, with the gate's verdict and table.
    assert "Promotion gate: passed" in model_page, model_page[:3000]
    assert "min_teacher_retention" in model_page and "gate check" in model_page
    for png in ("mlflow_ui_run.png", "mlflow_ui_model_version.png"):
        assert (ARTIFACTS / png).stat().st_size > 20_000  # a rendered page, not a blank one
