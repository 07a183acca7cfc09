"""Rule files are checked on load, and a bad one is refused with a message that says
what is wrong and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from raresignal.server.rules import Relative, RulesError, load_rules, parse_rules

DEFAULT_ALERTS = {
    "RareSignalFisherCollapse", "RareSignalAbsorbed", "RareSignalRetentionLoss",
    "RareSignalInterference", "SharpnessAboveStability", "SubspaceDriftSpike",
    "FisherRankCollapse", "NonFiniteGradients", "RunStalled",
}


def test_default_rules_cover_the_design_table() -> None:
    rules = {rule.alert: rule for rule in load_rules()}
    assert set(rules) == DEFAULT_ALERTS
    collapse = rules["RareSignalFisherCollapse"].condition
    assert collapse is not None
    assert (collapse.metric, collapse.op, collapse.threshold, collapse.relative_to) == (
        "probe_fisher_mass_ratio", "<", 0.2, Relative.BASELINE_RATIO)
    absorbed = rules["RareSignalAbsorbed"]
    assert absorbed.while_condition is not None
    assert absorbed.while_condition.metric == "probe_loss"
    assert rules["RunStalled"].stalled_for_intervals == 5
    assert rules["SubspaceDriftSpike"].condition.relative_to is Relative.BASELINE_MAD
    for rule in rules.values():  # every rule has hysteresis on the safe side or none
        if rule.condition and rule.condition.relative_to is not Relative.BASELINE_MAD:
            if rule.condition.points_down:
                assert rule.resolve_threshold >= rule.condition.threshold
            else:
                assert rule.resolve_threshold <= rule.condition.threshold


def rule(**fields: object) -> str:
    base: dict[str, object] = {"alert": "X", "metric": "probe_retention", "op": "<",
                               "threshold": 0.3}
    base.update(fields)
    body = "\n".join(f"    {k}: {v}" for k, v in base.items() if v is not None)
    return "rules:\n  -\n" + body + "\n"


@pytest.mark.parametrize(("text", "message"), [
    (rule(metric="probe_fisher"), "unknown metric 'probe_fisher'"),
    (rule(op='"=="'), "unknown op '=='"),
    (rule(threshold="high"), "threshold must be a finite number, got 'high'"),
    (rule(threshold=".nan"), "threshold must be a finite number"),
    (rule(threshold=None), "threshold is missing"),
    (rule(resolve_threshold=0.2), "resolve_threshold 0.2 must be at least threshold 0.3"),
    (rule(op='">"', resolve_threshold=0.5), "must be at most threshold 0.3"),
    (rule(relative_to="baseline_mad", threshold=3, resolve_threshold=4),
     "must be at most threshold 3 MADs"),
    (rule(relative_to="median"), "unknown relative_to 'median'"),
    (rule(severity="page"), "unknown severity 'page'"),
    (rule(**{"for": 0}), "for must be an integer >= 1, got 0"),
    (rule(treshold=0.3), "unknown rule key(s) 'treshold'"),
    (rule(summary='"{probe} {colour}"'), "cannot be formatted"),
    (rule(baseline="{window: 0}"), "baseline.window must be an integer >= 1"),
    (rule(baseline="{smoothing: 2}"), "baseline.smoothing must be in (0, 1]"),
    (rule(smoothing=0), "smoothing must be in (0, 1], got 0"),
    (rule(**{"while": "{metric: fisher_trace, op: '<', threshold: 1}"}),
     "has label(s) ['group'] that 'probe_retention' lacks"),
    (rule(alert='"not a name"'), "alert must be a name"),
    ("rules: [{alert: S, stalled_for_intervals: -1}]", "stalled_for_intervals must be > 0"),
    ("rules: [{alert: S, stalled_for_intervals: 5, metric: loss}]", "unknown stall rule key"),
    ("rules:\n  - alert: A\n    metric: loss\n    op: '<'\n    threshold: 1\n"
     "  - alert: A\n    metric: loss\n    op: '<'\n    threshold: 1\n", "defined twice"),
    ("alerts: []", "expected a mapping with a 'rules' list"),
    ("rules: [\n", "not valid YAML"),
])
def test_bad_rules_are_refused_with_a_precise_message(text: str, message: str) -> None:
    with pytest.raises(RulesError) as raised:
        parse_rules(text, "bad.yaml")
    assert message in str(raised.value)
    assert str(raised.value).startswith("bad.yaml")


def test_the_message_names_the_rule_by_index_and_name() -> None:
    text = rule() + "  - {alert: Second, metric: nope, op: '<', threshold: 1}\n"
    with pytest.raises(RulesError, match=r"rules\[1\] \(Second\): rule: unknown metric 'nope'"):
        parse_rules(text, "r.yaml")


def test_load_rules_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "absent.yaml")


def test_a_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rule(resolve_threshold=0.4, severity="info", **{"for": 2}))
    (loaded,) = load_rules(path)
    assert (loaded.alert, loaded.resolve_threshold, loaded.for_evaluations,
            loaded.severity) == ("X", 0.4, 2, "info")
