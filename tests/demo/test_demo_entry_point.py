"""The demo, run as a user runs it (``python -m raresignal.demo``), in its reduced mode:
the alert must fire before the rare probe's accuracy halves, and the control run must
raise none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

# The quick demo takes well under a minute; the margin is for heavily loaded machines.
DEMO_TIMEOUT_SECONDS = 600


def _run_in_own_session(command: list[str], env: dict[str, str]
                        ) -> subprocess.CompletedProcess[str]:
    """Runs ``command`` in a session of its own, so that on a timeout the whole process
    group goes (the demo starts its server as a child, which would outlive a killed demo
    and hold its port and files)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"the demo ran past {DEMO_TIMEOUT_SECONDS} s:\n"
                        f"{stdout[-3000:]}{stderr[-3000:]}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _run_demo(out: Path, *flags: str) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = _run_in_own_session(
        [sys.executable, "-m", "raresignal.demo", "--quick", "--no-progress",
         "--out", str(out), *flags], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kind = "healthy" if "--healthy" in flags else "collapse"
    summary = json.loads((out / f"summary-{kind}.json").read_text())
    with Image.open(summary["report"]) as image:
        assert image.size[0] >= 600 and image.size[1] >= 800
    assert "/metrics" in summary["metrics_url"]
    return summary


@pytest.mark.slow
def test_collapse_run_alerts_before_the_rare_accuracy_halves(tmp_path: Path) -> None:
    summary = _run_demo(tmp_path)
    assert summary["peak_rare_accuracy"] >= 0.9, summary
    assert summary["alerts"], f"no alert fired: {summary}"
    assert summary["half_accuracy_step"] is not None, "the collapse did not happen"
    assert summary["first_alert_step"] < summary["half_accuracy_step"], summary
    assert summary["first_alert_step"] >= summary["collapse_step"], "alert before the collapse"


@pytest.mark.slow
def test_healthy_control_run_raises_no_alert(tmp_path: Path) -> None:
    summary = _run_demo(tmp_path, "--healthy")
    assert summary["peak_rare_accuracy"] >= 0.9, summary
    assert summary["half_accuracy_step"] is None, summary
    assert summary["alerts"] == [], summary


def test_help_explains_the_demo_and_its_options() -> None:
    result = subprocess.run([sys.executable, "-m", "raresignal.demo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for text in ("--healthy", "--steps", "--out", "--quick", "rare", "alert", "/metrics"):
        assert text in result.stdout, text
