"""Rule files are checked on load, and a bad one is refused with a message that says
what is wrong and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from raresignal.server.alerting.rules import (
    Relative,
    Rule,
    RulesError,
    StallSpec,
    default_rules_text,
    load_rules,
    parse_rules,
)

DEFAULT_ALERTS = {
    "RareProbeLossRise", "RareProbeLossRiseOnUpdateSurge", "RareProbeLossJumpOnUpdateSurge",
    "RareProbeLossSpikeOnUpdateSurge", "SharpnessAboveStability",
    "SubspaceDriftSpike", "FisherRankCollapse", "NonFiniteGradients",
    "RunStalled",
}
# Opt-in: described (as comments) in default_rules.yaml, with the reason they are off.
OPT_IN_ALERTS = ("RareSignalFisherCollapse", "RareSignalRetentionLoss",
                 "RareSignalInterference", "SharpnessRising", "RareSignalAbsorbed")


def test_default_rules_are_the_shipped_set() -> None:
    rules = {rule.alert: rule for rule in load_rules()}
    # The geometric rare-signal rules are opt-in: RareSignalFisherCollapse because a
    # probe's sampled-label Fisher mass also falls as the model grows sure of the slice;
    # retention and interference because they fired on healthy runs of task families
    # they were not tuned on (default_rules.yaml says why and how to add them).
    assert set(rules) == DEFAULT_ALERTS
    loss_rise = rules["RareProbeLossRise"].condition
    assert loss_rise is not None and (loss_rise.metric, loss_rise.op, loss_rise.threshold,
                                      loss_rise.relative_to) == (
        "probe_loss", ">", 0.45, Relative.RUNNING_BEST)
    assert rules["RunStalled"].stall == StallSpec(step_time_factor=20, step_time_quantile=0.95,
                                                  floor_seconds=300, history=64, learn_after=8)
    surge = rules["RareProbeLossRiseOnUpdateSurge"]
    assert surge.while_condition is not None and surge.while_baseline is not None
    assert (surge.while_condition.metric, surge.while_condition.relative_to) == (
        "update_to_weight_ratio_at_peak_lr", Relative.TRAILING_RATIO)
    assert surge.gained == 0.5  # the probe learned, by half a nat, before a rise counts
    # One outlying probe reading, or a catapult's two surging ratio readings, is not
    # enough: the labelled rule reads the median of the last 50 steps' readings and
    # compares it with the best of the last 1000 steps, the surge must last three.
    main = rules["RareProbeLossRise"]
    assert (main.median_over_steps, main.best_over_steps) == (50, 1000)
    assert surge.while_for == 3
    assert (surge.median_over_steps, surge.best_over_steps) == (0, 0)
    # The jump: twice the probe's own recent median, while the same surge has lasted two
    # ratio readings (one is a catapult's).
    jump = rules["RareProbeLossJumpOnUpdateSurge"]
    assert jump.condition is not None and jump.while_condition is not None
    assert (jump.condition.metric, jump.condition.threshold, jump.condition.relative_to,
            jump.while_for) == ("probe_loss", 2.0, Relative.TRAILING_RATIO, 2)
    assert jump.while_condition == surge.while_condition
    # The spike: twenty times that median, at the first reading of the same surge.
    spike = rules["RareProbeLossSpikeOnUpdateSurge"]
    assert spike.condition is not None
    assert (spike.condition.threshold, spike.condition.relative_to, spike.while_for,
            spike.gained) == (20.0, Relative.TRAILING_RATIO, 1, 0.5)
    assert spike.while_condition == surge.while_condition
    # The rare-signal rules watch the rare probes, not the common reference probe.
    for name in ("RareProbeLossRise", "RareProbeLossRiseOnUpdateSurge",
                 "RareProbeLossJumpOnUpdateSurge", "RareProbeLossSpikeOnUpdateSurge"):
        assert rules[name].ignores({"probe": "common"}), name
        assert not rules[name].ignores({"probe": "rare"}), name
    assert rules["SubspaceDriftSpike"].condition.relative_to is Relative.BASELINE_MAD
    for rule in rules.values():  # every rule has hysteresis on the safe side or none
        if rule.condition and rule.condition.relative_to not in (Relative.BASELINE_MAD,
                                                                 Relative.RUNNING_BEST):
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
    (rule(hold=-1), "hold must be an integer >= 0, got -1"),
    (rule(hold=2.5), "hold must be an integer >= 0, got 2.5"),
    ("rules: [{alert: S, stall: {}, hold: 3}]", "unknown stall rule key(s) 'hold'"),
    ("rules: [{alert: S, stall: {floor: 3}}]", "unknown stall key(s) 'floor'"),
    ("rules: [{alert: S, stall: {step_time_factor: 0.5}}]", "step_time_factor must be >= 1"),
    ("rules: [{alert: S, stall: {step_time_quantile: 0}}]", "must be in (0, 1]"),
    ("rules: [{alert: S, stall: {history: 4, learn_after: 5}}]",
     "learn_after (5) must be at most stall.history (4)"),
    ("rules: [{alert: S, stall: {}, summary: '{intervals}'}]", "cannot be formatted"),
    (rule(treshold=0.3), "unknown rule key(s) 'treshold'"),
    (rule(summary='"{probe} {colour}"'), "cannot be formatted"),
    (rule(baseline="{window: 0}"), "baseline.window must be an integer >= 1"),
    (rule(baseline="{smoothing: 2}"), "baseline.smoothing must be in (0, 1]"),
    (rule(smoothing=0), "smoothing must be in (0, 1], got 0"),
    (rule(median_over_steps=-1), "median_over_steps must be an integer >= 0, got -1"),
    (rule(median_over_steps=1.5), "median_over_steps must be an integer >= 0, got 1.5"),
    (rule(best_over_steps=100), "best_over_steps applies to a rule relative_to: "
                                "running_best only"),
    (rule(metric="probe_loss", op='">"', threshold=0.1, relative_to="running_best",
          best_over_steps=0), "best_over_steps must be an integer >= 1, got 0"),
    (rule(**{"while": "{metric: probe_loss, op: '>', threshold: 1, for: 0}"}),
     "while.for must be an integer >= 1, got 0"),
    (rule(**{"while": "{metric: fisher_trace, op: '<', threshold: 1}"}),
     "has label(s) ['group'] that 'probe_retention' lacks"),
    (rule(alert='"not a name"'), "alert must be a name"),
    (rule(gained=0.5), "gained applies to a rule relative_to: running_best or "
                       "trailing_ratio only"),
    (rule(metric="probe_loss", op='">"', threshold=0.1, relative_to="running_best",
          gained=-1), "gained must be >= 0"),
    (rule(**{"while": "{metric: probe_loss, op: '>', threshold: 1, window: 3}"}),
     "unknown while key(s) 'window'"),
    (rule(**{"while": "{metric: probe_loss, op: '>', threshold: 1, baseline: {window: 0}}"}),
     "baseline.window must be an integer >= 1"),
    (rule(ignore_labels="{group: [x]}"), "metric 'probe_retention' has no label 'group'"),
    (rule(ignore_labels="{probe: 3}"), "ignore_labels.probe must be a label value or a list"),
    (rule(ignore_labels="[common]"), "ignore_labels must be a mapping of label to value(s)"),
    ("rules: [{alert: S, stall: {floor_seconds: -1}}]", "floor_seconds must be > 0"),
    ("rules: [{alert: S, stall: {}, metric: loss}]", "unknown stall rule key"),
    ("rules: [{alert: S, stalled_for_intervals: 5}]",
     "write `stall:` with any of floor_seconds, history"),
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


def test_hold_defaults_to_the_rules_default_and_can_be_set_or_turned_off() -> None:
    (default,) = parse_rules(rule())
    assert default.hold == Rule.hold > 0
    (set_, off) = parse_rules(rule(hold=12) + rule(alert="Y", hold=0).removeprefix("rules:\n"))
    assert (set_.hold, off.hold) == (12, 0)


def test_a_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rule(resolve_threshold=0.4, severity="info", **{"for": 2}))
    (loaded,) = load_rules(path)
    assert (loaded.alert, loaded.resolve_threshold, loaded.for_evaluations,
            loaded.severity) == ("X", 0.4, 2, "info")


def opt_in_rule(name: str) -> Rule:
    """The opt-in rule ``name`` as default_rules.yaml describes it in a comment."""
    lines = default_rules_text().splitlines()
    start = lines.index(f"#   - alert: {name}")
    block = [lines[start][3:]]
    for line in lines[start + 1:]:
        if not line.startswith("#     "):
            break
        block.append(line[3:])
    (rule,) = parse_rules("rules:\n" + "\n".join(block) + "\n", "default_rules.yaml comment")
    return rule


@pytest.mark.parametrize("name", OPT_IN_ALERTS)
def test_the_opt_in_rules_described_in_the_defaults_are_valid_rules(name: str) -> None:
    rule = opt_in_rule(name)
    assert rule.alert == name
    assert rule.condition is not None
    if rule.condition.metric.startswith("probe_"):  # a rare-signal rule
        assert rule.ignores({"probe": "common"}) and not rule.ignores({"probe": "rare"})


def test_the_opt_in_sharpness_rise_is_relative_to_the_runs_own_spread() -> None:
    rising = opt_in_rule("SharpnessRising").condition
    assert rising is not None and (rising.metric, rising.op, rising.relative_to) == (
        "sharpness_ratio", ">", Relative.BASELINE_MAD)


def test_the_opt_in_fisher_rule_is_smoothed_and_sustained() -> None:
    rule = opt_in_rule("RareSignalFisherCollapse")
    assert rule.smoothing < 1 and rule.for_evaluations > 3
