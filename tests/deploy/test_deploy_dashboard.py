"""The dashboard's variables, units, filters and legends: every panel has a unit, every
query filters on each dashboard variable its series carry, and legends tell two runs of
one name apart. Checked on the file, and against a real Prometheus scraping a real
server that holds two runs of one name."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy_support import PrometheusServer, dashboard, substitute_variables
from test_deploy_prometheus_e2e import _batches, scraping_prometheus

from raresignal.client.channels import open_channel
from raresignal.protos.catalog import CATALOG
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from raresignal.server.serving.app import ServerConfig, start_in_thread

# The dashboard variables that narrow a run's series, each the name of the label it filters.
FILTER_VARIABLES = ("run", "run_id", "probe")
# Labels of the series the server builds itself (the catalogue's get run and run_id).
# A run series' freshness companions carry its labels and the catalogue name, as metric.
COMPANION_LABELS = {"run", "run_id", "metric", *{label for spec in CATALOG.values()
                                                for label in spec.labels}}
SERVER_SERIES_LABELS = {
    "raresignal_alert_firing": {"run", "run_id", "probe", "alert", "severity"},
    "raresignal_runs": {"state"},
    "raresignal_ingest_batches_total": {"outcome"},
    "raresignal_run_last_step": {"run", "run_id"},
    "raresignal_run_last_report_timestamp_seconds": {"run", "run_id"},
    "raresignal_run_finished_timestamp_seconds": {"run", "run_id"},
    "raresignal_series_last_step": COMPANION_LABELS,
    "raresignal_series_last_measured_timestamp_seconds": COMPANION_LABELS,
}
# Series on which a label is present only for some samples: the filter must also let the
# others through (a run-level alert has no probe, nor has the companion of a run series).
OPTIONAL_LABELS = {"raresignal_alert_firing": {"probe"},
                   "raresignal_series_last_step": {"probe"},
                   "raresignal_series_last_measured_timestamp_seconds": {"probe"}}
# The panels that say how old the probe panels' values are, and their units.
PROBE_AGE_PANELS = {"Probe measured, seconds ago": "s", "Probe measured, steps ago": "none"}
# Grafana's unit ids the panels may use.
GRAFANA_UNITS = {"none", "short", "percent", "percentunit", "s", "ms", "bytes", "reqps",
                 "ops"}
SELECTOR = re.compile(r"\b(raresignal_[a-z_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
RUN = "dashboard-two-runs"
DEADLINE_SECONDS = 90.0


def series_labels(series: str) -> set[str]:
    """The labels a series exposed at /metrics may carry."""
    for spec in CATALOG.values():
        if spec.prometheus_name == series:
            return {"run", "run_id", *spec.labels}
    return SERVER_SERIES_LABELS[series]


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def filter_problems(board: dict[str, Any]) -> list[str]:
    """Queries that ignore a dashboard variable whose label their series carry."""
    problems = []
    for panel in _panels(board):
        for target in panel["targets"]:
            for series, matchers in SELECTOR.findall(target["expr"]):
                found = {name: (op, value) for name, op, value in MATCHER.findall(matchers)}
                for label in series_labels(series) & set(FILTER_VARIABLES):
                    wanted = f"${label}|" if label in OPTIONAL_LABELS.get(series, ()) \
                        else f"${label}"
                    if found.get(label) != ("=~", wanted):
                        problems.append(f"{panel['title']} / {target['refId']}: {series} "
                                        f'without {label}=~"{wanted}"')
    return problems


def legend_problems(board: dict[str, Any]) -> list[str]:
    """Time-series queries whose legend leaves out a variable's label their series carry
    (two runs of one name would draw as one legend entry)."""
    problems = []
    for panel in _panels(board):
        for target in panel["targets"]:
            if target.get("format") == "table":
                continue  # a table shows every label as a column
            labels = set().union(*(series_labels(series) for series, _ in
                                   SELECTOR.findall(target["expr"])))
            for label in labels & set(FILTER_VARIABLES):
                if f"{{{{{label}}}}}" not in target["legendFormat"]:
                    problems.append(f"{panel['title']} / {target['refId']}: legend without "
                                    f"{label}")
    return problems


def unit_problems(board: dict[str, Any]) -> list[str]:
    problems = []
    for panel in _panels(board):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if unit not in GRAFANA_UNITS:
            problems.append(f"{panel['title']}: unit {unit!r}")
    return problems


def test_every_panel_has_a_unit() -> None:
    board = dashboard()
    assert unit_problems(board) == []
    unitless = copy.deepcopy(board)
    del _panels(unitless)[3]["fieldConfig"]["defaults"]["unit"]
    assert len(unit_problems(unitless)) == 1


def test_fractions_are_drawn_as_percentages() -> None:
    units = {panel["title"]: panel["fieldConfig"]["defaults"]["unit"]
             for panel in _panels(dashboard())}
    for title in ("Absorption and bulk residual", "Retention", "Probe accuracy",
                  "Subspace overlap", "Agent overhead"):
        assert units[title] == "percentunit", title


def test_every_query_filters_on_the_variables_of_its_series() -> None:
    board = dashboard()
    assert filter_problems(board) == []
    # Guards the check: a query that drops the run_id or the probe filter is caught.
    for dropped in ('run_id=~"$run_id", ', ', probe=~"$probe"'):
        loose = copy.deepcopy(board)
        for panel in _panels(loose):
            for target in panel["targets"]:
                target["expr"] = target["expr"].replace(dropped, "", 1)
        assert filter_problems(loose), dropped


def test_legends_name_run_run_id_and_probe() -> None:
    board = dashboard()
    assert legend_problems(board) == []
    anonymous = copy.deepcopy(board)
    for panel in _panels(anonymous):
        for target in panel["targets"]:
            target["legendFormat"] = target["legendFormat"].replace("{{run_id}}", "")
    assert legend_problems(anonymous)


def test_run_id_and_probe_variables_chain_to_run() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    names = [v["name"] for v in dashboard()["templating"]["list"]]
    # Grafana resolves variables in order: each one after those it refers to.
    assert names == ["datasource", "run", "run_id", "probe"]
    for name, narrowed_by in (("run_id", ("run",)), ("probe", ("run", "run_id"))):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${datasource}"
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        assert variable["refresh"] == variables["run"]["refresh"]
        assert variable["definition"] == variable["query"]["query"]
        assert variable["definition"].startswith("label_values(")
        assert variable["definition"].endswith(f", {name})")
        for label in narrowed_by:
            assert f'{label}=~"${label}"' in variable["definition"], (name, label)


def _panel(title: str) -> dict[str, Any]:
    (panel,) = [p for p in _panels(dashboard()) if p["title"] == title]
    return panel


def test_probe_rows_show_the_age_of_their_measurements() -> None:
    board = dashboard()
    probe_row = next(p for p in board["panels"] if p["title"] == "Rare-signal probes")
    first_probe_panel = min(p["gridPos"]["y"] for p in _panels(board)
                            if "raresignal_probe_" in p["targets"][0]["expr"])
    for title, unit in PROBE_AGE_PANELS.items():
        panel = _panel(title)
        assert panel["fieldConfig"]["defaults"]["unit"] == unit, title
        # Between the row's title and the probe values they qualify.
        assert probe_row["gridPos"]["y"] < panel["gridPos"]["y"] < first_probe_panel, title
        (target,) = panel["targets"]
        assert 'metric=~"probe_.+"' in target["expr"], title


def _label_values(prometheus: PrometheusServer, definition: str) -> list[str]:
    """What Grafana's ``label_values(selector, label)`` returns, asked of Prometheus."""
    selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", definition).groups()
    answer = prometheus.api(f"label/{label}/values",
                            **{"match[]": substitute_variables(selector)})
    assert answer["status"] == "success", answer
    return sorted(answer["data"])


def _report_run(target: str) -> str:
    with open_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        opened = stub.OpenRun(ingest_pb2.OpenRunRequest(
            run_name=RUN, world_size=1, report_interval_seconds=60.0), timeout=10)
        acks = list(stub.Report(_batches(opened.run_id), timeout=30))
    assert {a.outcome for a in acks} == {ingest_pb2.ReportAck.OUTCOME_APPLIED}
    return opened.run_id


def _wait_for_runs(prometheus: PrometheusServer, run_ids: set[str]) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while _label_values(prometheus, 'label_values(raresignal_alert_firing, run_id)') \
            != sorted(run_ids):
        assert time.monotonic() < deadline, "Prometheus did not scrape both runs' alerts"
        time.sleep(0.5)


def _legend(legend_format: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{(\w+)\}\}", lambda match: labels.get(match.group(1), ""),
                  legend_format)


def test_two_runs_of_one_name_draw_as_two_lines(
        start_prometheus: Callable[[dict[str, Any]], PrometheusServer],
        tmp_path: Path) -> None:
    config = ServerConfig(db_path=str(tmp_path / "raresignal.db"), host="127.0.0.1",
                          grpc_port=0, metrics_port=0, health_port=0)
    with start_in_thread(config) as server:
        prometheus = scraping_prometheus(start_prometheus, server.metrics_url, tmp_path)
        run_ids = {_report_run(server.grpc_target), _report_run(server.grpc_target)}
        assert len(run_ids) == 2
        _wait_for_runs(prometheus, run_ids)

        variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
        assert _label_values(prometheus, variables["run"]["definition"]) == [RUN]
        assert _label_values(prometheus, variables["run_id"]["definition"]) == sorted(run_ids)
        assert _label_values(prometheus, variables["probe"]["definition"]) == [
            "common", "rare"]

        for panel in _panels(dashboard()):
            for target in panel["targets"]:
                if not set(FILTER_VARIABLES) & set().union(*(
                        series_labels(s) for s, _ in SELECTOR.findall(target["expr"]))):
                    continue  # the server's own series: one line whatever the runs
                answer = prometheus.query(substitute_variables(target["expr"]))
                assert answer["status"] == "success", answer
                series = [s["metric"] for s in answer["data"]["result"]]
                name = f"{panel['title']} / {target['refId']}"
                assert {s["run_id"] for s in series} == run_ids, name
                if target.get("format") != "table":
                    legends = {_legend(target["legendFormat"], s) for s in series}
                    assert len(legends) == len(series), name


STALE_STEP, LAST_STEP = 3, 500
STALE_SECONDS = 3600.0


def _report_stale_rare_probe(target: str, measured_at: float) -> str:
    """A run whose rare probe was last measured at step 3, an hour before its common
    probe and loss at step 500."""
    def at(metric: str, step: int, wall_time: float, **labels: str) -> common_pb2.Sample:
        return common_pb2.Sample(metric=metric, labels=labels, step=step, value=0.5,
                                 wall_time=wall_time)

    with open_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        run_id = stub.OpenRun(ingest_pb2.OpenRunRequest(
            run_name=RUN, world_size=1, report_interval_seconds=60.0), timeout=10).run_id
        batches = [
            [at("probe_accuracy", STALE_STEP, measured_at - STALE_SECONDS, probe="rare")],
            [at("probe_accuracy", LAST_STEP, measured_at, probe="common"),
             at("loss", LAST_STEP, measured_at)],
        ]
        acks = list(stub.Report(iter(
            ingest_pb2.ReportBatch(run_id=run_id, sender_id="rank0-e2e", sequence=sequence,
                                   samples=samples)
            for sequence, samples in enumerate(batches, 1)), timeout=30))
    assert {a.outcome for a in acks} == {ingest_pb2.ReportAck.OUTCOME_APPLIED}
    return run_id


def _ages(prometheus: PrometheusServer, title: str) -> dict[str, float]:
    """The probe-age panel's value per probe, once Prometheus has scraped both probes."""
    (target,) = _panel(title)["targets"]
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        answer = prometheus.query(substitute_variables(target["expr"]))
        assert answer["status"] == "success", answer
        ages = {s["metric"]["probe"]: float(s["value"][1]) for s in answer["data"]["result"]}
        if set(ages) == {"common", "rare"}:
            return ages
        assert time.monotonic() < deadline, f"{title}: {ages}"
        time.sleep(0.5)


def test_probe_age_panels_read_steps_and_seconds_since_measured(
        start_prometheus: Callable[[dict[str, Any]], PrometheusServer],
        tmp_path: Path) -> None:
    config = ServerConfig(db_path=str(tmp_path / "raresignal.db"), host="127.0.0.1",
                          grpc_port=0, metrics_port=0, health_port=0)
    with start_in_thread(config) as server:
        prometheus = scraping_prometheus(start_prometheus, server.metrics_url, tmp_path)
        measured_at = time.time()
        _report_stale_rare_probe(server.grpc_target, measured_at)

        steps = _ages(prometheus, "Probe measured, steps ago")
        assert steps == {"common": 0.0, "rare": float(LAST_STEP - STALE_STEP)}

        seconds = _ages(prometheus, "Probe measured, seconds ago")
        now = time.time()
        assert 0.0 <= seconds["common"] <= now - measured_at
        assert STALE_SECONDS <= seconds["rare"] <= STALE_SECONDS + now - measured_at
