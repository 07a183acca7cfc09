"""The detection benchmark's scoring at tiny size: ground truth, lead time, false alarms,
the reference alarm, the alert engine it scores raresignal with, and the tuning."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import detection
import detection_report
import detection_tuning
from detection_detectors import Alarm, MarginAlarm, probe_loss_alarms, raresignal_alarms
from detection_families import SETTINGS
from detection_scenarios import SCENARIOS_BY_NAME, TrainingSetup, ramp
from detection_scoring import ground_truth_step, score, summarize
from detection_traces import RunPlan, RunTrace, with_ratio_at_peak_lr
from detection_tuning import (
    Fold,
    candidate_rules_yaml,
    choose_rule,
    folds,
    settings_grid,
    with_threshold,
)
from rule_snippets import FISHER_MASS_RULE, SHORT_BASELINE_DEFAULTS

from raresignal.server.alerting.rules import load_rules, parse_rules

torch.set_num_threads(1)


# A baseline-ratio rule of the kind the shipped file may hold (the opt-in Fisher mass rule,
# with the default short warm-up): the benchmark must score whatever the rules say.
RATIO_RULES = SHORT_BASELINE_DEFAULTS + "rules:" + FISHER_MASS_RULE


def _ratio_rule():
    return parse_rules(RATIO_RULES)[0]


# A family whose chance accuracy is 1/4: halfway from a 0.9 peak to chance is 0.575.
FAMILY = "minority_class"


def _trace(collapse: bool = True, switch: int = 100, accuracy: list[float] | None = None,
           samples: list | None = None, family: str = FAMILY, seed: int = 0,
           probe_loss: list[float] | None = None) -> RunTrace:
    accuracy = accuracy if accuracy is not None else [0.9] * 40
    plan = RunPlan(family=family, scenario="s" if collapse else "c", collapse=collapse,
                   seed=seed, steps=200, change_step=switch, ramp_steps=0, eval_every=5,
                   probe_size=8, heldout_size=8)
    return RunTrace(plan, samples=samples or [],
                    eval_steps=[5 * i for i in range(len(accuracy))],
                    heldout_accuracy=accuracy,
                    probe_loss=probe_loss if probe_loss is not None else [0.1] * len(accuracy))


def test_ground_truth_is_first_step_after_the_change_halfway_from_peak_to_chance() -> None:
    steps = [0, 5, 10, 15, 20, 25, 30]
    # Chance 0.1, peak 0.9 at step 15: halfway is 0.5; 0.5 is not below, 0.49 is.
    accuracy = [0.1, 0.3, 0.8, 0.9, 0.5, 0.49, 0.3]
    assert ground_truth_step(steps, accuracy, 0, 0.1) == 25
    # A fall before the change step is not the collapse; the first one after is.
    assert ground_truth_step(steps, accuracy, 30, 0.1) == 30
    # A skill never learned (peak below halfway from chance to 1) cannot collapse.
    assert ground_truth_step(steps[:3], [0.1, 0.5, 0.05], 0, 0.1) is None
    assert ground_truth_step(steps[:3], [0.9, 0.8, 0.7], 0, 0.1) is None
    assert SETTINGS[FAMILY].chance == 0.25


def test_score_counts_pre_switch_alarms_as_false_and_measures_lead_time() -> None:
    accuracy = [0.9] * 30 + [0.3] * 10  # ground truth at step 150
    trace = _trace(switch=100, accuracy=accuracy)
    outcome = score(trace, "d", [Alarm(40, "a"), Alarm(120, "b"), Alarm(160, "c")])
    assert outcome.ground_truth == 150
    assert outcome.false_alarms == 1  # the alarm at step 40 came before anything happened
    assert (outcome.first_alarm, outcome.first_source, outcome.lead) == (120, "b", 30)
    assert outcome.detected and outcome.early
    assert outcome.lead_share == pytest.approx(30 / 50)  # the collapse took 50 steps
    late = score(trace, "d", [Alarm(170, "c")])
    assert late.lead == -20 and late.detected and not late.early
    healthy = score(_trace(collapse=False), "d", [Alarm(150, "a"), Alarm(180, "b")])
    assert healthy.false_alarms == 2 and not healthy.detected
    survived = score(_trace(switch=100), "d", [Alarm(120, "a")])
    assert survived.no_collapse and not survived.scorable and survived.false_alarms == 0
    summary = summarize([outcome, late, healthy, survived])
    assert (summary.scorable, summary.detected, summary.early) == (2, 2, 1)
    assert summary.no_collapse == 1
    assert summary.median_lead == 5  # median of +30 and -20
    assert summary.false_alarm_runs == 2
    # Healthy steps: 100 before each change of the three collapse runs, and 200 of the
    # control; three false alarms in 500 healthy steps are 60 per 10,000.
    assert summary.healthy_steps == 500
    assert summary.false_alarms_per_unit == pytest.approx(60.0)


def test_probe_loss_alarm_fires_half_a_nat_above_the_running_minimum() -> None:
    # Minimum 0.2 (after the warm-up); 0.69 is within 0.5 of it, 0.8 is not; the second
    # point in a row above is the alarm; it re-arms once back within the margin.
    values = [2.0, 0.2, 0.5, 0.69, 0.8, 0.8, 0.8, 0.3, 0.9, 0.9]
    steps = [10 * i for i in range(len(values))]
    assert MarginAlarm(0.5, consecutive=2, warmup=1).alarms(steps, values) == [50, 90]
    assert MarginAlarm(0.8, consecutive=2, warmup=1).alarms(steps, values) == []
    # The warm-up point (2.0, the untrained model) never sets the minimum.
    assert MarginAlarm(0.5, consecutive=1, warmup=1).alarms(steps[:2], values[:2]) == []
    assert MarginAlarm(0.5, consecutive=1, warmup=0).alarms([0, 1], [1.0, math.nan]) == [1]
    losses = [0.1] * 20 + [0.7] * 5
    alarms = probe_loss_alarms(_trace(accuracy=[0.9] * 25, probe_loss=losses))
    assert alarms == [Alarm(5 * 21, "probe_loss_rise")]


def test_raresignal_detector_is_the_servers_alert_engine_with_shipped_rules() -> None:
    # The rare probe's Fisher mass ratio every 10 steps: 1.0, then far below the shipped
    # fraction of that baseline. The engine skips `warmup` evaluations, learns the baseline
    # from the next `window`, then needs `for` consecutive breaches: the alarm step follows
    # from the shipped rule itself, whatever values the rules file holds today.
    fisher = _ratio_rule()
    shipped = [*load_rules(None), fisher]
    assert fisher.condition is not None
    ready = fisher.baseline.warmup + fisher.baseline.window
    drop = ready + 2  # evaluation index of the first low value
    low = fisher.condition.threshold / 4
    labels = (("probe", "rare"),)
    samples = [(10 * i, "probe_fisher_mass_ratio", labels, 1.0 if i < drop else low)
               for i in range(drop + fisher.for_evaluations + 5)]
    trace = _trace(samples=samples)
    expected = 10 * (drop + fisher.for_evaluations - 1)
    assert raresignal_alarms(trace, shipped) == [Alarm(expected, "RareSignalFisherCollapse")]
    # A threshold below the drop keeps it quiet: the engine really reads the rule.
    assert raresignal_alarms(trace, [with_threshold(fisher, low / 2)]) == []
    # Non-finite values never reach the engine, as the agent never sends them.
    nan_trace = _trace(samples=[(5, "nonfinite_values", (), 1.0),
                                (6, "probe_fisher_mass_ratio", labels, math.nan)])
    assert raresignal_alarms(nan_trace, shipped) == [Alarm(5, "NonFiniteGradients")]


def test_changes_ramp_in_from_the_change_step() -> None:
    assert [ramp(s, 10, 4) for s in (9, 10, 11, 13, 20)] == [None, 0.25, 0.5, 1.0, 1.0]
    assert ramp(10, 10, 0) == 1.0  # no ramp: all at once
    settings = replace(SETTINGS[FAMILY], rare_fraction=0.04)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.01,
                                  weight_decay=0.1)
    setup = TrainingSetup(optimizer, torch.Generator().manual_seed(0), rare_fraction=0.04,
                          batch_size=settings.batch_size)
    setup.capture()
    group = optimizer.param_groups[0]
    # Every change is a function of the values at the switch and the progress, so calling
    # it each step of the ramp never compounds.
    for _ in range(3):
        SCENARIOS_BY_NAME["lr_spike"].change(setup, settings, 0.5)
    assert group["lr"] == pytest.approx(0.01 * settings.lr_spike_factor ** 0.5)
    SCENARIOS_BY_NAME["weight_decay_jump"].change(setup, settings, 0.25)
    assert group["weight_decay"] == pytest.approx(
        0.1 + 0.25 * (settings.collapse_weight_decay - 0.1))
    SCENARIOS_BY_NAME["drop_rare"].change(setup, settings, 0.75)
    assert setup.rare_fraction == pytest.approx(0.01)
    SCENARIOS_BY_NAME["finetune_other_task"].change(setup, settings, 0.4)
    assert setup.downstream_fraction == 0.4
    SCENARIOS_BY_NAME["rare_learned_late"].change(setup, settings, 0.5)
    assert setup.rare_fraction == pytest.approx(0.02)
    SCENARIOS_BY_NAME["batch_size_change"].change(setup, settings, 1.0)
    assert setup.batch_size == 4 * settings.batch_size
    cosine = SCENARIOS_BY_NAME["warmup_cosine"].schedule
    cosine(setup, settings, 0.05)
    assert group["lr"] == pytest.approx(settings.learning_rate)  # the warm-up's peak
    cosine(setup, settings, 0.999)
    assert group["lr"] == pytest.approx(0.1 * settings.learning_rate, rel=1e-3)
    restarts = SCENARIOS_BY_NAME["warm_restarts"].schedule
    for restart in (0.1, 0.3, 0.7):  # SGDR: each cycle twice the last, peak at once
        restarts(setup, settings, restart - 1e-9)
        assert group["lr"] == pytest.approx(0.1 * settings.learning_rate, rel=1e-3)
        restarts(setup, settings, restart + 1e-9)
        assert group["lr"] == pytest.approx(settings.learning_rate)
    restarts(setup, settings, 0.5)  # half-way through the cycle from 30% to 70%
    assert group["lr"] == pytest.approx(0.55 * settings.learning_rate)


def test_tuning_chooses_the_for_that_warns_earliest_without_a_false_alarm() -> None:
    fisher = _ratio_rule()
    assert fisher.condition is not None and fisher.for_evaluations >= 3
    ready = fisher.baseline.warmup + fisher.baseline.window
    labels = (("probe", "rare"),)
    low = fisher.condition.threshold / 4

    def series(lows: set[int], n: int) -> list:
        return [(10 * i, "probe_fisher_mass_ratio", labels, low if i in lows else 1.0)
                for i in range(n)]

    n = ready + 20
    # The collapse run's ratio drops for good at evaluation ready + 4 (step 10(ready+4));
    # the healthy run has a single low evaluation at ready + 2.
    collapse = _trace(switch=10 * (ready + 2), samples=series(set(range(ready + 4, n)), n),
                      accuracy=[0.9] * (2 * (ready + 8)) + [0.1] * 40)
    healthy = _trace(collapse=False, samples=series({ready + 2}, n))
    # Shipped `for` fires 10 (for - 1) steps after the drop; `for` 1 would warn at the drop
    # but also on the healthy blip; `for` 2 is the earliest quiet choice.
    choice = choose_rule(fisher, [fisher.condition.threshold], [collapse, healthy])
    assert (choice.value, choice.for_evaluations) == (fisher.condition.threshold, 2)
    quiet = choose_rule(fisher, [fisher.condition.threshold], [collapse])
    assert quiet.for_evaluations == 1  # with no healthy blip, the earliest wins


def test_tuning_smooths_a_rule_when_that_warns_earlier_than_a_longer_for(
        tmp_path: Path) -> None:
    fisher = _ratio_rule()
    assert fisher.condition is not None and fisher.smoothing == 1.0
    fisher = with_threshold(fisher, 0.2, 3)
    ready = fisher.baseline.warmup + fisher.baseline.window
    labels = (("probe", "rare"),)
    n = ready + 20

    def series(values: dict[int, float]) -> list:
        return [(10 * i, "probe_fisher_mass_ratio", labels, values.get(i, 1.0))
                for i in range(n)]

    # Healthy: two evaluations in a row at 0.15 x baseline (below 0.2: `for` 2 cries wolf;
    # their EWMA at weight 0.5 only reaches 0.36). Collapse: the ratio goes to -1 for good
    # at evaluation ready + 4: `for` 3 fires two evaluations later, the EWMA (0) at once.
    healthy = _trace(collapse=False, samples=series({ready + 2: 0.15, ready + 3: 0.15}))
    drop = ready + 4
    collapse = _trace(switch=10 * (ready + 2), samples=series({i: -1.0 for i in range(drop, n)}),
                      accuracy=[0.9] * (2 * (ready + 8)) + [0.1] * 40)
    choice = choose_rule(fisher, [0.2], [collapse, healthy])
    assert (choice.for_evaluations, choice.smoothing) == (1, 0.5)
    tuned = with_threshold(fisher, 0.2, choice.for_evaluations, choice.smoothing)
    assert raresignal_alarms(collapse, [tuned]) == [Alarm(10 * drop, fisher.alert)]
    assert raresignal_alarms(healthy, [tuned]) == []
    # The candidate rules file carries the chosen `for` and smoothing, and loads.
    text = candidate_rules_yaml(RATIO_RULES, {fisher.alert: choice})
    (tmp_path / "candidate.yaml").write_text(text)
    loaded = next(r for r in load_rules(tmp_path / "candidate.yaml")
                  if r.alert == fisher.alert)
    assert (loaded.for_evaluations, loaded.smoothing) == (1, 0.5)
    # A raw choice for a rule shipped smoothed leaves the candidate unsmoothed.
    smoothed_rules = RATIO_RULES.replace("    for: 3\n", "    for: 3\n    smoothing: 0.5\n")
    assert "smoothing: 0.5" in smoothed_rules
    (tmp_path / "raw.yaml").write_text(candidate_rules_yaml(
        smoothed_rules, {fisher.alert: replace(choice, smoothing=1.0)}))
    assert load_rules(tmp_path / "raw.yaml")[0].smoothing == 1.0


def test_a_threshold_is_chosen_only_with_a_notch_of_margin() -> None:
    # Grid least to most sensitive: 3 alarms late, 2 and 1 earlier; 1 cries wolf too.
    accuracy = [0.9] * 30 + [0.1] * 10  # ground truth at step 150
    collapse, healthy = _trace(accuracy=accuracy), _trace(collapse=False)
    alarms = {3.0: (140, None), 2.0: (130, None), 1.0: (120, 50)}

    def detector_for(value: float):
        at, false = alarms[value]
        return lambda trace: ([Alarm(at, "x")] if trace.plan.collapse
                              else [Alarm(false, "x")] if false else [])

    choice = detection_tuning.choose("x", [3.0, 2.0, 1.0], [collapse, healthy],
                                     detector_for)
    # 2.0 is the earliest quiet point, but the next more sensitive (1.0) is not quiet.
    assert choice.value == 3.0
    alarms[1.0] = (120, None)  # now 1.0 is quiet: 2.0 has its margin, 1.0 has none
    assert detection_tuning.choose("x", [3.0, 2.0, 1.0], [collapse, healthy],
                                   detector_for).value == 2.0


def test_help_teaches_and_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        detection.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--quick", "--save-traces", "--load-traces", "--tune-families", "--jobs",
                 "--no-tuning",
                 "ground truth", "held out", "drop_rare", "checkpoint_resume", "Examples"):
        assert word in text
    with pytest.raises(SystemExit):
        detection.main(["--families", "no_such_family"])


def test_the_settings_tried_do_not_depend_on_the_shipped_ones() -> None:
    # Tuning the tuned rules must choose them again: every rule is tried at the same
    # (`for`, smoothing) pairs, whatever it ships with, its own pair first.
    rule = _ratio_rule()
    variants = [with_threshold(rule, 0.2, n, a) for n, a in ((1, 1.0), (3, 0.3), (6, 0.5))]
    grids = [settings_grid(r) for r in variants]
    for r, grid in zip(variants, grids, strict=True):
        assert grid[0] == (r.for_evaluations, r.smoothing)
        assert len(set(grid)) == len(grid)
    assert set(grids[0]) == set(grids[1])
    # A `for` outside the grid adds its own pairs and takes none away.
    assert set(grids[0]) < set(grids[2])
    assert {n for n, _ in set(grids[2]) - set(grids[0])} == {6}


def test_leave_one_family_out_never_tunes_on_the_family_it_reports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    families = ["a", "b", "c"]
    default = folds(families, None)
    assert [f.held_out for f in default] == [("a",), ("b",), ("c",)]
    for fold in default:
        assert not set(fold.tuning) & set(fold.held_out)
        assert set(fold.tuning) | set(fold.held_out) == set(families)
    assert folds(families, ["a", "b"]) == [Fold(("a", "b"), ("c",))]
    with pytest.raises(ValueError, match="none is left"):
        folds(families, families)
    # The scoring of a fold hands the tuning only the tuning families' runs, and reports
    # only the held-out family's.
    traces = [_trace(family=f, seed=s, collapse=s == 0) for f in SETTINGS for s in (0, 1)]
    tuned_on: list[set[str]] = []
    real_tune = detection_report.tune_rules

    def spy(rules, tuning_traces, cache=None):
        tuned_on.append({t.plan.family for t in tuning_traces})
        return real_tune(rules, tuning_traces, cache)

    monkeypatch.setattr(detection_report, "tune_rules", spy)
    report = detection_report.run_report(traces, load_rules(None), folds(list(SETTINGS), None))
    assert len(tuned_on) == len(SETTINGS)
    for fold, seen in zip(report["folds"], tuned_on, strict=True):
        assert seen == set(fold["tuning"]) and not seen & set(fold["held_out"])
    reported = {(o.family, o.detector) for o in report["outcomes"]}
    assert {f for f, _ in reported} == set(SETTINGS)
    # Every run is reported once per detector: under the one fold that held it out.
    per_detector = [o for o in report["outcomes"] if o.detector == detection_report.TUNED]
    assert sorted(o.run for o in per_detector) == sorted(t.name for t in traces)


def test_the_folds_replay_each_run_once_per_rule_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Collapse runs whose rare probe learns and then loses its skill; healthy runs that
    # learn and keep it: the rules alarm on the first kind only.
    def probe(collapse: bool) -> list:
        losses = [2.0, 1.5, 1.0, 0.5] + [0.1] * 16 + ([3.0] * 20 if collapse else [0.1] * 20)
        return [(10 * i, "probe_loss", (("probe", "rare"),), v) for i, v in enumerate(losses)]

    traces = [_trace(family=f, seed=s, collapse=s == 0, switch=150, samples=probe(s == 0),
                     accuracy=[0.9] * 30 + ([0.1] if s == 0 else [0.9]) * 10)
              for f in ("minority_class", "digits") for s in (0, 1)]
    rare = [r for r in load_rules(None) if detection_tuning.is_rare_signal(r)]
    uncached = [detection_tuning.tune_rules(rare, traces[:2]),
                detection_tuning.tune_rules(rare, traces)]
    replays: list[tuple] = []
    real = detection_tuning.raresignal_alarms

    def counted(trace, rules):
        replays.append((tuple(rules), trace.name))
        return real(trace, rules)

    monkeypatch.setattr(detection_tuning, "raresignal_alarms", counted)
    cache: detection_tuning.AlarmCache = {}
    cached = [detection_tuning.tune_rules(rare, traces[:2], cache),
              detection_tuning.tune_rules(rare, traces, cache)]
    # The same choices as replaying every time, and no run replayed twice with the same
    # rule: the second tuning replays only the runs the first did not see.
    assert cached == uncached
    assert any(c.value is not None for c in cached[1].values())
    assert len(replays) == len(set(replays))
    assert {name for _, name in replays} == {t.name for t in traces}


def _outcome(run: str, detector: str, collapse: bool, lead: int | None = None,
             false_alarms: int = 0) -> detection_report.Outcome:
    truth = 300 if collapse else None
    return detection_report.Outcome(
        run=run, family="f", scenario="s", collapse=collapse, seed=0, detector=detector,
        change_step=200, healthy_steps=200 if collapse else 1000, ground_truth=truth,
        false_alarms=false_alarms,
        first_alarm=None if lead is None else 300 - lead,
        first_source=None if lead is None else "r", lead=lead)


def test_the_targets_are_stated_and_checked() -> None:
    rare, probe = detection_report.SHIPPED, detection_report.PROBE_LOSS
    controls = [_outcome(f"c{i}", d, False) for i in range(40) for d in (rare, probe)]
    # Nine of ten collapses warned early (lead 40); the probe-loss alarm led by 20 in the
    # same runs: 40 >= 2 x 20.
    collapses = [_outcome(f"x{i}", rare, True, 40 if i < 9 else -5) for i in range(10)]
    collapses += [_outcome(f"x{i}", probe, True, 20) for i in range(10)]
    lines = detection_report.verdicts(controls + collapses, rare)
    assert [line.split("]")[0].strip() for line in lines] == ["[met"] * 3
    assert "9/10" in lines[1] and "+40" in lines[2] and "+20" in lines[2]
    # One alarmed control, or too few controls, misses the first target; a lead under
    # twice the reference's misses the third.
    noisy = [*controls[:-2], _outcome("c39", rare, False, false_alarms=1)]
    assert detection_report.verdicts(noisy + collapses, rare)[0].startswith("  [MISSED]")
    assert detection_report.verdicts(controls[:60] + collapses, rare)[0].startswith(
        "  [MISSED]")
    slow = [o if o.detector == rare else _outcome(o.run, probe, True, 25) for o in collapses]
    assert detection_report.verdicts(controls + slow, rare)[2].startswith("  [MISSED]")


def test_a_rule_relative_to_a_trailing_median_is_tuned_on_the_ratio_grid() -> None:
    from raresignal.server.alerting.rules import parse_rules

    (surge,) = parse_rules("rules:\n  - {alert: S, metric: update_to_weight_ratio, op: '>', "
                           "threshold: 4, relative_to: trailing_ratio}\n")
    assert detection_tuning.grid_for(surge) == detection_tuning.RISE_RATIO_GRID


def test_one_familys_runs_are_scored_with_the_shipped_rules_alone(
        capsys: pytest.CaptureFixture[str]) -> None:
    (fold,) = folds(["digits"], None)
    assert fold == Fold((), ("digits",))
    traces = [_trace(family="digits", seed=s, collapse=s == 0) for s in (0, 1)]
    report = detection_report.run_report(traces, load_rules(None), [fold])
    detectors = {o.detector for o in report["outcomes"]}
    assert detection_report.TUNED not in detectors
    assert detection_report.SHIPPED in detectors
    detection.print_report(report, {})
    printed = capsys.readouterr().out
    assert "tuned on nothing (the rules as given only); held out: digits" in printed
    assert f"Targets, {detection_report.TUNED}" not in printed


def test_traces_without_the_ratio_at_peak_lr_get_it_derived_as_the_agent_computes_it(
        ) -> None:
    """Traces recorded before the agent reported the ratio at the peak learning rate get
    it from their recorded ratio and rate: each reading rescaled by the highest rate up
    to its step over that step's rate (recorded after the ratio within a step)."""
    samples = [(0, "update_to_weight_ratio", (), 0.02), (0, "learning_rate", (), 0.1),
               (5, "learning_rate", (), 0.01),
               (10, "update_to_weight_ratio", (), 0.002), (10, "learning_rate", (), 0.01),
               (20, "update_to_weight_ratio", (), 0.02), (20, "learning_rate", (), 0.1),
               (20, "probe_loss", (("probe", "rare"),), 0.3)]
    derived = with_ratio_at_peak_lr(samples)
    assert [(step, value) for step, metric, _, value in derived
            if metric == "update_to_weight_ratio_at_peak_lr"] == [
        (0, pytest.approx(0.02)), (10, pytest.approx(0.02)), (20, pytest.approx(0.02))]
    assert [sample for sample in derived
            if sample[1] != "update_to_weight_ratio_at_peak_lr"] == samples
    assert with_ratio_at_peak_lr(derived) == derived  # reported by the agent: kept as is
