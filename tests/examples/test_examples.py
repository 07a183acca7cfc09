"""Each example, run as a user runs it, reaches a real server on loopback with its run and
its rare-slice probe series."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raresignal.agent.cadence import plan_cadence
from raresignal.agent.estimators import EstimatorConfig
from raresignal.client.channels import open_channel
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2
from raresignal.server.serving.app import ServerConfig, start_in_thread

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Enough steps for two probe measurements: the examples measure probes every 25 steps.
STEPS = 30
# The examples set nothing: their probes run at the cadence the rule gives their planned
# length.
PROBE_INTERVAL = plan_cadence(EstimatorConfig().probes_interval, True, STEPS).interval


def _spacings(steps: list[int]) -> set[int]:
    return {later - earlier for earlier, later in itertools.pairwise(steps)}


# A bound on a hung example, not a speed target: the examples take seconds.
EXAMPLE_TIMEOUT_SECONDS = 600
CASES = {
    "plain_torch.py": "rare_class",
    "lightning_classifier.py": "rare_class",
    "hf_trainer.py": "counting_down",
}




def run_example(script: str, tmp_path: Path, *args: str) -> str:
    """Runs ``examples/<script>`` in its own process; its output, or the test fails with it."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", str(STEPS),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=EXAMPLE_TIMEOUT_SECONDS)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def stored_run(target: str, run_name: str) -> object:
    with open_channel(target) as channel:
        runs = alerts_pb2_grpc.RunsStub(channel).ListRuns(
            alerts_pb2.ListRunsRequest(include_finished=True), timeout=10).runs
    matching = [run for run in runs if run.run_name == run_name]
    assert len(matching) == 1, [run.run_name for run in runs]
    return matching[0]


def stored_steps(target: str, run_id: str, metric: str, probe: str) -> list[int]:
    with open_channel(target) as channel:
        response = alerts_pb2_grpc.RunsStub(channel).GetSeries(
            alerts_pb2.GetSeriesRequest(run_id=run_id, metric=metric,
                                        labels={"probe": probe}), timeout=10)
    return [int(sample.step) for sample in response.samples]


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_reports_its_run_and_probe_series(script: str, server: object,
                                                  tmp_path: Path) -> None:
    run_name = f"test-{Path(script).stem}"
    output = run_example(script, tmp_path, "--server", server.grpc_target,
                         "--run-name", run_name)

    run = stored_run(server.grpc_target, run_name)
    assert run.state == common_pb2.RUN_STATE_COMPLETED
    probe = CASES[script]
    for metric in ("probe_accuracy", "probe_loss"):
        steps = stored_steps(server.grpc_target, run.run_id, metric, probe)
        assert len(steps) >= 2 and _spacings(steps) == {PROBE_INTERVAL}, (metric, steps)
    # The user was told where the run went, and its id.
    assert f"raresignal: run '{run_name}' reports to {server.grpc_target}" in output
    assert f"--run {run.run_id}" in output


def test_example_starts_its_own_server_when_asked(tmp_path: Path) -> None:
    db_path = tmp_path / "kept.db"
    run_example("plain_torch.py", tmp_path, "--start-server", "--db", str(db_path),
                "--run-name", "test-own-server")

    # The script's server has stopped; one started on the file it kept has the run.
    handle = start_in_thread(ServerConfig(db_path=str(db_path), host="127.0.0.1",
                                          grpc_port=0, metrics_port=0, health_port=0))
    try:
        run = stored_run(handle.grpc_target, "test-own-server")
        steps = stored_steps(handle.grpc_target, run.run_id, "probe_accuracy", "rare_class")
        assert len(steps) >= 2 and _spacings(steps) == {PROBE_INTERVAL}, steps
    finally:
        handle.stop()
