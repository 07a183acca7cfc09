"""The Prometheus rules file, checked and unit-tested by promtool."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_support import CHART_DIR, REPO_ROOT, RULES_FILE

from raresignal.server.alerting.rules import Rule, default_rules_text, load_rules, parse_rules

RULES_TEST = Path(__file__).with_name("rules_test.yaml")
SERVER_RULES = REPO_ROOT / "server" / "alerting" / "default_rules.yaml"


def _alerts(path: Path) -> dict[str, dict]:
    document = yaml.safe_load(path.read_text())
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_promtool_check_rules(promtool_binary: str) -> None:
    result = _run(promtool_binary, "check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts(RULES_FILE))} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool_binary: str) -> None:
    result = _run(promtool_binary, "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    cases: dict[str, list[int]] = {}
    for group in tests:
        for case in group["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(len(case.get("exp_alerts", [])))
    for alert in _alerts(RULES_FILE):
        assert 0 in cases.get(alert, []), f"{alert}: no case where it stays quiet"
        assert any(n > 0 for n in cases.get(alert, [])), f"{alert}: no case where it fires"


def test_unit_tests_fail_when_a_threshold_moves(promtool_binary: str, tmp_path: Path) -> None:
    """Guards the unit tests: they notice a rule that no longer fires where it should."""
    moved = RULES_FILE.read_text().replace("raresignal_agent_overhead_ratio > 0.05",
                                           "raresignal_agent_overhead_ratio > 0.5")
    assert moved != RULES_FILE.read_text()
    (tmp_path / "rules.yaml").write_text(moved)
    test_file = yaml.safe_load(RULES_TEST.read_text())
    test_file["rule_files"] = ["rules.yaml"]
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(test_file))
    result = _run(promtool_binary, "test", "rules", str(tmp_path / "rules_test.yaml"))
    assert result.returncode != 0
    assert "RareSignalAgentOverheadHigh" in result.stdout + result.stderr


def test_server_alerts_are_mirrored_one_to_one_with_their_severity() -> None:
    server_rules = yaml.safe_load(SERVER_RULES.read_text())["rules"]
    group = next(g for g in yaml.safe_load(RULES_FILE.read_text())["groups"]
                 if g["name"] == "raresignal-server-alerts")
    mirrored = {rule["alert"]: rule for rule in group["rules"]}
    assert set(mirrored) == {rule["alert"] for rule in server_rules}
    for rule in server_rules:
        mirror = mirrored[rule["alert"]]
        assert mirror["expr"] == f'raresignal_alert_firing{{alert="{rule["alert"]}"}} == 1'
        assert mirror["labels"]["severity"] == rule["severity"]


def test_every_alert_has_annotations_and_a_runbook_section() -> None:
    readme = (CHART_DIR.parent / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9-]", "", line[4:].strip().lower())
               for line in readme.splitlines() if line.startswith("### ")}
    for name, rule in _alerts(RULES_FILE).items():
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        anchor = annotations["runbook_url"].rsplit("#", 1)[1]
        assert anchor == name.lower() and anchor in anchors, name



# -- the chart mirrors the server's default rules, and each alert once ---------------------

SERVER_GROUP = "raresignal-server-alerts"
RAW_GROUP = "raresignal-raw-series"


def _opt_in_rules() -> list[Rule]:
    """The rules the defaults file describes in its header but leaves off."""
    lines = default_rules_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("#   - alert: ")]
    block = []
    for start in starts:
        for line in lines[start:]:
            if not line.startswith("#  "):
                break
            block.append(line[3:])
    return parse_rules("rules:\n" + "\n".join(block) + "\n", "default_rules.yaml comment")


def _metrics_read(rule: Rule) -> set[str]:
    conditions = [c for c in (rule.condition, rule.while_condition) if c is not None]
    return {f"raresignal_{c.metric}" for c in conditions}


def _mirror_problems(document: dict, defaults: list[Rule], opt_in: list[Rule]) -> list[str]:
    """What makes the Prometheus rules disagree with the server's default rules.

    A raw-series rule that reads a series some server rule evaluates is a second form of
    that server alert: it either duplicates the server-alerts mirror of a default rule or
    raises an alert the server leaves off by default. Either way it must not exist.
    """
    problems = []
    names = [rule["alert"] for group in document["groups"] for rule in group["rules"]]
    problems += [f"{name} is defined twice" for name in sorted(set(names))
                 if names.count(name) > 1]
    groups = {group["name"]: group["rules"] for group in document["groups"]}
    mirrored = {rule["alert"] for rule in groups[SERVER_GROUP]}
    on_by_default = {rule.alert for rule in defaults}
    problems += [f"{SERVER_GROUP} mirrors {name}, which the server does not ship on by default"
                 for name in sorted(mirrored - on_by_default)]
    problems += [f"{SERVER_GROUP} lacks the default rule {name}"
                 for name in sorted(on_by_default - mirrored)]
    for prometheus_rule in groups[RAW_GROUP]:
        series = set(re.findall(r"\braresignal_[a-z0-9_]+", prometheus_rule["expr"]))
        for server_rule in [*defaults, *opt_in]:
            if series & _metrics_read(server_rule):
                why = ("duplicates the server's own mirror" if server_rule.alert in on_by_default
                       else "is not on by default in the server")
                problems.append(f"{prometheus_rule['alert']} raises {server_rule.alert} on raw "
                                f"series, which {why}")
    return problems


def test_prometheus_rules_follow_the_servers_default_rules() -> None:
    opt_in = _opt_in_rules()
    assert opt_in, "the defaults file no longer describes its opt-in rules"
    document = yaml.safe_load(RULES_FILE.read_text())
    assert _mirror_problems(document, load_rules(), opt_in) == []


def _raw_rule(alert: str, expr: str) -> dict:
    return {"alert": alert, "expr": expr, "labels": {"severity": "warning"}}


@pytest.mark.parametrize(("added", "problem"), [
    (_raw_rule("RareSignalProbeFisherMassLow", "raresignal_probe_fisher_mass_ratio < 0.2"),
     "raises RareSignalFisherCollapse on raw series, which is not on by default"),
    (_raw_rule("RareSignalSharpnessRatioHigh", "raresignal_sharpness_ratio > 1.1"),
     "raises SharpnessAboveStability on raw series, which duplicates"),
    (_raw_rule("RunStalled", "changes(raresignal_step[15m]) == 0"),
     "RunStalled is defined twice"),
])
def test_the_mirror_check_catches_a_second_form_of_a_server_alert(added: dict,
                                                                  problem: str) -> None:
    """Guards the check above with the rules it exists to keep out."""
    document = yaml.safe_load(RULES_FILE.read_text())
    next(g for g in document["groups"] if g["name"] == RAW_GROUP)["rules"].append(added)
    problems = _mirror_problems(document, load_rules(), _opt_in_rules())
    assert any(problem in found for found in problems), problems


def test_the_mirror_check_catches_an_opt_in_rule_in_the_server_group() -> None:
    document = yaml.safe_load(RULES_FILE.read_text())
    server_group = next(g for g in document["groups"] if g["name"] == SERVER_GROUP)
    name = "RareSignalFisherCollapse"
    server_group["rules"].append(_raw_rule(name, f'raresignal_alert_firing{{alert="{name}"}} == 1'))
    problems = _mirror_problems(document, load_rules(), _opt_in_rules())
    assert problems == ["raresignal-server-alerts mirrors RareSignalFisherCollapse, which the "
                        "server does not ship on by default"]
