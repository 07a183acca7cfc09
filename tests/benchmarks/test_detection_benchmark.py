"""The detection benchmark's core at tiny size: ground truth, lead time, false alarms,
baseline alarms and the alert engine it scores raresignal with."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import detection
import detection_tuning
from detection_detectors import (
    Alarm,
    RiseAlarm,
    SpikeAlarm,
    raresignal_alarms,
)
from detection_runs import RunPlan, RunTrace, train_run
from detection_scenarios import SCENARIOS_BY_NAME, TrainingSetup, progress
from detection_scoring import ground_truth_step, score, summarize
from detection_tasks import MinorityClassTask
from detection_tuning import candidate_rules_yaml, choose_rule, settings_grid, with_threshold
from rule_snippets import FISHER_MASS_RULE, SHORT_BASELINE_DEFAULTS

from raresignal.server.alerting.rules import load_rules, parse_rules

torch.set_num_threads(1)


# A baseline-ratio rule of the kind the shipped file may hold (the opt-in Fisher mass rule,
# with the default short warm-up): the benchmark must score whatever the rules say.
RATIO_RULES = SHORT_BASELINE_DEFAULTS + "rules:" + FISHER_MASS_RULE


def _ratio_rule():
    return parse_rules(RATIO_RULES)[0]


def _trace(collapse: bool = True, switch: int = 100, accuracy: list[float] | None = None,
           samples: list | None = None) -> RunTrace:
    accuracy = accuracy if accuracy is not None else [0.9] * 40
    return RunTrace(family="f", scenario="s", collapse=collapse, seed=0, switch_step=switch,
                    steps=200, samples=samples or [],
                    eval_steps=[5 * i for i in range(len(accuracy))], rare_accuracy=accuracy,
                    rare_loss=[0.1] * len(accuracy))


def test_ground_truth_is_first_step_below_half_the_running_peak() -> None:
    steps = [0, 5, 10, 15, 20, 25, 30]
    # Peak 0.9 at step 15; 0.45 is exactly half (not below); 0.44 at step 25 is below.
    assert ground_truth_step(steps, [0.1, 0.3, 0.8, 0.9, 0.45, 0.44, 0.3]) == 25
    # A rule never learned (peak 0.4 < 0.5) cannot collapse, however low it goes.
    assert ground_truth_step(steps[:3], [0.1, 0.4, 0.05]) is None
    assert ground_truth_step(steps[:3], [0.9, 0.8, 0.7]) is None


def test_score_counts_pre_switch_alarms_as_false_and_measures_lead_time() -> None:
    accuracy = [0.9] * 30 + [0.3] * 10  # ground truth at step 150
    trace = _trace(switch=100, accuracy=accuracy)
    outcome = score(trace, "d", [Alarm(40, "a"), Alarm(120, "b"), Alarm(160, "c")])
    assert outcome.ground_truth == 150
    assert outcome.false_alarms == 1  # the alarm at step 40 came before anything happened
    assert (outcome.first_alarm, outcome.first_source, outcome.lead) == (120, "b", 30)
    assert outcome.detected and outcome.early
    late = score(trace, "d", [Alarm(170, "c")])
    assert late.lead == -20 and late.detected and not late.early
    healthy = score(_trace(collapse=False), "d", [Alarm(150, "a"), Alarm(180, "b")])
    assert healthy.false_alarms == 2 and not healthy.detected
    summary = summarize([outcome, late, healthy])
    assert (summary.scorable, summary.detected, summary.early) == (2, 2, 1)
    assert summary.median_lead == 5  # median of +30 and -20
    assert summary.false_alarm_runs == 2


def test_loss_rise_alarm_fires_at_the_computed_step() -> None:
    # With smoothing 1 the EWMA is the loss itself: the minimum is 1.0, the loss jumps to
    # 4.0 at step 20, and the third consecutive point above 3 x 1.0 is step 22.
    values = [2.0] * 10 + [1.0] * 10 + [4.0] * 5
    alarm = RiseAlarm(3.0, consecutive=3, smoothing=1.0, warmup=2)
    assert alarm.alarms(range(len(values)), values) == [22]
    assert RiseAlarm(5.0, consecutive=3, smoothing=1.0, warmup=2).alarms(
        range(len(values)), values) == []
    assert RiseAlarm(3.0, consecutive=1).alarms(range(3), [1.0, math.nan, 1.0]) == [1]


def test_grad_spike_alarm_fires_on_a_spike_only() -> None:
    values = [1.0 + 0.1 * (i % 3) for i in range(80)] + [5.0] + [1.0] * 5
    # History median 1.1, MAD 0.1: 5.0 is 39 MADs out, the wiggle is at most 1.
    alarm = SpikeAlarm(10.0, consecutive=1, window=50, warmup=20)
    assert alarm.alarms(range(len(values)), values) == [80]
    assert SpikeAlarm(50.0, consecutive=1, window=50, warmup=20).alarms(
        range(len(values)), values) == []


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


def test_changes_ramp_in_from_the_switch() -> None:
    assert [progress(s, 10, 4) for s in (9, 10, 11, 13, 20)] == [None, 0.25, 0.5, 1.0, 1.0]
    assert progress(10, 10, 0) == 1.0  # no ramp: all at once
    settings = MinorityClassTask.settings
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.01,
                                  weight_decay=0.1)
    setup = TrainingSetup(optimizer, torch.Generator().manual_seed(0), rare_fraction=0.04)
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
    SCENARIOS_BY_NAME["lr_decay"].change(setup, settings, 1.0)
    assert group["lr"] == pytest.approx(0.003)


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


def test_a_threshold_is_chosen_only_with_a_notch_of_margin() -> None:
    # Grid least to most sensitive: 3 alarms late, 2 and 1 earlier; 1 cries wolf too.
    accuracy = [0.9] * 30 + [0.1] * 10  # ground truth at step 150
    collapse, healthy = _trace(accuracy=accuracy), _trace(collapse=False)
    alarms = {3.0: (140, None), 2.0: (130, None), 1.0: (120, 50)}

    def detector_for(value: float):
        at, false = alarms[value]
        return lambda trace: ([Alarm(at, "x")] if trace.collapse
                              else [Alarm(false, "x")] if false else [])

    choice = detection_tuning.choose("x", [3.0, 2.0, 1.0], [collapse, healthy],
                                     detector_for)
    # 2.0 is the earliest quiet point, but the next more sensitive (1.0) is not quiet.
    assert choice.value == 3.0
    alarms[1.0] = (120, None)  # now 1.0 is quiet: 2.0 has its margin, 1.0 has none
    assert detection_tuning.choose("x", [3.0, 2.0, 1.0], [collapse, healthy],
                                   detector_for).value == 2.0


@pytest.fixture(scope="module")
def tiny_traces() -> list[RunTrace]:
    plan = RunPlan(steps=60, switch_step=40, ramp_steps=10, eval_every=5, probe_size=32,
                   probes_interval=5,
                   fisher_interval=5, drift_interval=5, sharpness_interval=20,
                   retention_warmup_step=20, sketch_dim=128)
    family = MinorityClassTask()
    return [train_run(family, SCENARIOS_BY_NAME[name], seed, plan)
            for name in ("drop_rare", "continued") for seed in (0, 1)]


def test_a_run_records_the_agents_measurements_and_exact_probe_evaluations(
        tiny_traces: list[RunTrace]) -> None:
    trace = tiny_traces[0]
    assert len(trace.loss) == len(trace.grad_norm) == 60
    assert trace.eval_steps == [*range(0, 60, 5), 59]
    assert not trace.estimator_errors
    by_metric: dict[str, dict[int, float]] = {}
    for step, metric, labels, value in trace.samples:
        if not labels:
            by_metric.setdefault(metric, {})[step] = value
    # The agent's loss and pre-clip gradient norm are those the loop saw at the same step:
    # the same float32 tensors, so they agree to float32 rounding (relative 1e-5).
    for step in (0, 30, 59):
        assert by_metric["loss"][step] == pytest.approx(trace.loss[step], rel=1e-5)
        assert by_metric["grad_norm"][step] == pytest.approx(trace.grad_norm[step], rel=1e-5)
    probe_steps = sorted(s for s, m, labels, _ in trace.samples
                         if m == "probe_fisher_mass_ratio" and labels == (("probe", "rare"),))
    # A fixed cadence (the scheduler may offset it, never stretch it): every 5 steps.
    assert len(probe_steps) == 12
    assert {b - a for a, b in itertools.pairwise(probe_steps)} == {5}
    restored = RunTrace.from_json(trace.to_json())
    assert restored.samples == trace.samples


def test_the_report_scores_every_detector_on_held_out_seeds(
        tiny_traces: list[RunTrace], capsys: pytest.CaptureFixture[str]) -> None:
    shipped = load_rules(None)
    report = detection.run_benchmark(tiny_traces, [0], shipped)
    assert report["held_out_seeds"] == [1]
    detectors = {o.detector for o in report["held_out"]}
    assert detectors == {detection.SHIPPED, detection.TUNED, "loss rise", "grad-norm spike",
                         "probe-loss rise"}
    assert {o.seed for o in report["held_out"]} == {1}
    assert len(report["held_out"]) == 5 * 2  # five detectors, two held-out runs
    for o in report["held_out"]:
        expected = score(next(t for t in tiny_traces if t.name == o.run), o.detector, [])
        assert o.ground_truth == expected.ground_truth
    detection.print_report(report, shipped)
    printed = capsys.readouterr().out
    assert "RareSignalInterference" in printed and "held-out seeds [1]" in printed


def test_help_teaches_and_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        detection.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--quick", "--seeds", "--json", "ground truth", "held-out", "drop_rare"):
        assert word in text
    with pytest.raises(SystemExit, match="--tuning-seeds"):
        detection.main(["--seeds", "0", "--tuning-seeds", "3"])


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
