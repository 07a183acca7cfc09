"""The Prometheus rules file, checked and unit-tested by promtool."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from deploy_support import CHART_DIR, REPO_ROOT, RULES_FILE

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
    moved = RULES_FILE.read_text().replace("raresignal_sharpness_ratio > 1.1",
                                           "raresignal_sharpness_ratio > 2")
    assert moved != RULES_FILE.read_text()
    (tmp_path / "rules.yaml").write_text(moved)
    test_file = yaml.safe_load(RULES_TEST.read_text())
    test_file["rule_files"] = ["rules.yaml"]
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(test_file))
    result = _run(promtool_binary, "test", "rules", str(tmp_path / "rules_test.yaml"))
    assert result.returncode != 0
    assert "RareSignalSharpnessRatioHigh" in result.stdout + result.stderr


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

