"""Every run series on /metrics says how old it is, and a finished run's series leave
/metrics on the TTL schedule. A real server on loopback, real SQLite, the real /metrics."""

from __future__ import annotations

import re
import time
from pathlib import Path

from server_support import Client, Scrape, batch, config, sample, scrape

from raresignal.protos.catalog import CATALOG, Kind
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread

REPO_ROOT = Path(__file__).parents[2]
RUN = "freshness"
FINISHED_TTL_SECONDS = 2.0
DEADLINE_SECONDS = 60.0
# Sample names of the catalogue's families, as /metrics writes them.
CATALOGUE_SERIES = {spec.prometheus_name: spec.name for spec in CATALOG.values()
                    if spec.kind is Kind.GAUGE}


def _value(metrics: Scrape, name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


# The common probe measured at step 3, the loss last at step 500.
PROBE = sample("probe_accuracy", 3, 0.33, probe="common")
LOSS = sample("loss", 500, 0.0007)


def _report_stale_probe(client: Client) -> str:
    run_id = client.open_run(RUN).run_id
    acks = client.report([batch(run_id, 1, [PROBE, sample("loss", 3, 2.0)]),
                          batch(run_id, 2, [LOSS])])
    assert [a.outcome for a in acks] == [acks[0].OUTCOME_APPLIED] * 2
    return run_id


def _run_series_ids(metrics: Scrape, run_id: str) -> set[tuple[str, frozenset]]:
    return {key for key in metrics if ("run_id", run_id) in key[1]}


def test_each_series_shows_its_step_and_measurement_time(server: ServerHandle,
                                                         client: Client) -> None:
    before = time.time()
    run_id = _report_stale_probe(client)
    after = time.time()
    metrics = scrape(server.metrics_url)
    run = {"run": RUN, "run_id": run_id}
    common = {**run, "probe": "common"}

    # The old value is still exposed, but says where it stands.
    assert _value(metrics, "raresignal_probe_accuracy", **common) == 0.33
    assert _value(metrics, "raresignal_series_last_step", metric="probe_accuracy",
                  **common) == 3
    assert _value(metrics, "raresignal_series_last_measured_timestamp_seconds",
                  metric="probe_accuracy", **common) == PROBE.wall_time
    assert _value(metrics, "raresignal_series_last_step", metric="loss", **run) == 500
    assert _value(metrics, "raresignal_series_last_measured_timestamp_seconds",
                  metric="loss", **run) == LOSS.wall_time
    assert _value(metrics, "raresignal_run_last_step", **run) == 500
    reported = _value(metrics, "raresignal_run_last_report_timestamp_seconds", **run)
    assert reported is not None and before <= reported <= after
    assert _value(metrics, "raresignal_run_finished_timestamp_seconds", **run) is None

    # Every catalogue series of the run has both companions, with its own labels.
    shown = [(name, dict(labels)) for name, labels in _run_series_ids(metrics, run_id)
             if name in CATALOGUE_SERIES]
    assert len(shown) == 2
    for name, labels in shown:
        for companion in ("raresignal_series_last_step",
                          "raresignal_series_last_measured_timestamp_seconds"):
            assert _value(metrics, companion, metric=CATALOGUE_SERIES[name],
                          **labels) is not None, (name, companion)


def test_freshness_survives_a_restart(tmp_path: Path) -> None:
    settings = config(tmp_path)
    with start_in_thread(settings) as server:
        client = Client(server.grpc_target)
        try:
            run_id = _report_stale_probe(client)
        finally:
            client.close()
        first = scrape(server.metrics_url)
    with start_in_thread(settings) as server:
        second = scrape(server.metrics_url)
    freshness = {key: first[key] for key in _run_series_ids(first, run_id)
                 if key[0].startswith(("raresignal_series_", "raresignal_run_"))}
    assert len(freshness) == 6
    assert {key: second.get(key) for key in freshness} == freshness


def _present(metrics: Scrape, run_id: str) -> bool:
    """Whether the run's series, companions and position are all on /metrics."""
    names = {name for name, _ in _run_series_ids(metrics, run_id)}
    wanted = {"raresignal_probe_accuracy", "raresignal_loss", "raresignal_series_last_step",
              "raresignal_series_last_measured_timestamp_seconds", "raresignal_run_last_step",
              "raresignal_run_last_report_timestamp_seconds",
              "raresignal_run_finished_timestamp_seconds"}
    assert names in (wanted, set()), names  # a run leaves whole, never in part
    return names == wanted


def test_finished_run_leaves_metrics_after_the_ttl(tmp_path: Path) -> None:
    """A scrape that ends before closed + TTL shows the run; one that starts after it does
    not. A scrape straddling the expiry proves nothing, so each run is retried fresh
    until one was seen before its expiry (the server and this test share one clock)."""
    with start_in_thread(config(tmp_path, finished_run_ttl_seconds=FINISHED_TTL_SECONDS)
                         ) as server:
        client = Client(server.grpc_target)
        try:
            deadline = time.monotonic() + DEADLINE_SECONDS
            while True:
                run_id = _report_stale_probe(client)
                finished_at = client.close_run(run_id).run.updated_at
                expires_at = finished_at + FINISHED_TTL_SECONDS
                metrics = scrape(server.metrics_url)
                if time.time() < expires_at:
                    assert _present(metrics, run_id)
                    assert _value(metrics, "raresignal_run_finished_timestamp_seconds",
                                  run=RUN, run_id=run_id) == finished_at
                    break
                assert time.monotonic() < deadline, "no scrape finished before the TTL"
            while True:
                started = time.time()
                metrics = scrape(server.metrics_url)
                if started > expires_at:
                    assert not _present(metrics, run_id)
                    break
                if time.time() < expires_at:
                    assert _present(metrics, run_id)
                assert time.monotonic() < deadline, "the TTL never passed"
                time.sleep(0.1)
            assert _value(metrics, "raresignal_runs", state="finished") >= 1
        finally:
            client.close()


def test_the_docs_state_the_default_finished_run_ttl() -> None:
    default = ServerConfig().finished_run_ttl_seconds
    for readme, setting in ((REPO_ROOT / "README.md", "`--finished-run-ttl`"),
                            (REPO_ROOT / "helm" / "README.md",
                             "`server.finishedRunTtlSeconds`")):
        text = " ".join(readme.read_text().split())
        stated = re.findall(re.escape(setting) + r"[^(]*\(default (\d+)", text)
        assert [float(s) for s in stated] == [default], readme
