"""Every PromQL expression of the dashboard and the rules, parsed by a real Prometheus, and
the dashboard's shape: the variables and panels an operator looks for."""

from __future__ import annotations

import re

import yaml
from deploy_support import RULES_FILE, dashboard, dashboard_queries

from raresignal.protos.catalog import CATALOG, PROMETHEUS_PREFIX

SERVER_OWN_SERIES = {
    "raresignal_alert_firing", "raresignal_runs", "raresignal_ingest_batches_total",
    "raresignal_alertmanager_notifications_total", "raresignal_run_last_step",
    "raresignal_series_last_step", "raresignal_series_last_measured_timestamp_seconds",
}

def rule_expressions() -> dict[str, str]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return {rule["alert"]: rule["expr"] for group in document["groups"]
            for rule in group["rules"]}


def test_prometheus_accepts_every_expression(start_prometheus) -> None:
    prometheus = start_prometheus({"global": {"scrape_interval": "15s"}})
    expressions = {**dashboard_queries(), **rule_expressions()}
    rejected = {}
    for name, expr in expressions.items():
        answer = prometheus.query(expr)
        if answer["status"] != "success":
            rejected[name] = answer.get("error")
    assert rejected == {}
    # Guards the check: the same server does reject a malformed expression.
    assert prometheus.query('raresignal_loss{run=~"$run"')["status"] == "error"


def test_expressions_name_only_series_the_server_exposes() -> None:
    known = {spec.prometheus_name + ("_total" if spec.kind.value == "counter" else "")
             for spec in CATALOG.values()} | SERVER_OWN_SERIES
    expressions = {**dashboard_queries(), **rule_expressions()}
    for name, expr in expressions.items():
        series = set(re.findall(r"\b(" + PROMETHEUS_PREFIX + r"[a-z_]+)\b", expr))
        assert series, f"{name}: names no raresignal series"
        assert series <= known, f"{name}: unknown series {series - known}"


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query"
    assert run["definition"] == "label_values(raresignal_step, run)"
    assert run["datasource"]["uid"] == "${datasource}"
    # Every query goes to the chosen data source, so the file imports into any Grafana.
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_has_a_panel_for_each_signal() -> None:
    queries = "\n".join(dashboard_queries().values())
    for metric in ("probe_fisher_mass_ratio", "probe_absorption", "probe_bulk_residual",
                   "probe_retention", "sharpness_ratio", "subspace_overlap",
                   "fisher_effective_rank", "gradient_noise_scale", "agent_overhead_ratio",
                   "probe_accuracy", "loss", "alert_firing"):
        assert f"raresignal_{metric}{{run=~\".*\"" in queries, metric


def test_sharpness_panel_draws_the_stability_line_at_one() -> None:
    (panel,) = [p for p in dashboard()["panels"]
                if any("raresignal_sharpness_ratio" in t["expr"] for t in p.get("targets", []))]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] == "line"
    assert [s["value"] for s in defaults["thresholds"]["steps"]] == [None, 1]


def test_firing_alerts_panel_is_an_instant_table() -> None:
    (panel,) = [p for p in dashboard()["panels"] if p["title"] == "Firing alerts"]
    assert panel["type"] == "table"
    (target,) = panel["targets"]
    assert target["instant"] is True and target["format"] == "table"


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, panel["title"]
        assert grid["x"] + grid["w"] <= 24
        taken |= cells
