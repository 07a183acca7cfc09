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
from raresignal.protos.v1 import ingest_pb2, ingest_pb2_grpc
from raresignal.server.serving.app import ServerConfig, start_in_thread

# The dashboard variables that narrow a run's series, each the name of the label it filters.
FILTER_VARIABLES = ("run", "run_id", "probe")
# Labels of the series the server builds itself (the catalogue's get run and run_id).
SERVER_SERIES_LABELS = {
    "raresignal_alert_firing": {"run", "run_id", "probe", "alert", "severity"},
    "raresignal_runs": {"state"},
    "raresignal_ingest_batches_total": {"outcome"},
}
# Series on which a label is present only for some samples: the filter must also let the
# others through (a run-level alert has no probe).
OPTIONAL_LABELS = {"raresignal_alert_firing": {"probe"}}
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
