"""The detection benchmark's runs at tiny size: change steps, controls, checkpoint-resume,
trace files, resumed recordings, and each family's rare skill learned and lost."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from detection_detectors import probe_loss_alarms, raresignal_alarms
from detection_families import FAMILIES, SETTINGS
from detection_recording import RecordingConfig, estimate_seconds, plan_runs, record
from detection_runs import (
    build_monitor,
    checkpoint,
    full_batch,
    make_optimizer,
    resume,
    train_run,
)
from detection_scenarios import CONTROLS, SCENARIOS_BY_NAME
from detection_scoring import LEARNED_SHARE, score, trace_ground_truth
from detection_traces import (
    CHANGE_WINDOW,
    RunPlan,
    RunTrace,
    TraceWriter,
    draw_change_step,
    read_trace,
    recorded,
    with_probe_loss_every,
)

from raresignal.server.alerting.rules import load_rules

torch.set_num_threads(1)

# The quickest family to train, and one with every control (edge of stability too).
QUICK_FAMILY = "minority_class"


def _plan(scenario: str, steps: int = 40, change_step: int = 20, seed: int = 0,
          family: str = QUICK_FAMILY, eval_every: int = 5) -> RunPlan:
    return RunPlan(family=family, scenario=scenario,
                   collapse=SCENARIOS_BY_NAME[scenario].collapse, seed=seed, steps=steps,
                   change_step=change_step, ramp_steps=steps // 20, eval_every=eval_every,
                   probe_size=32, heldout_size=64)


def test_the_change_step_is_drawn_in_30_to_70_percent_and_varies_with_the_seed() -> None:
    steps = 5000
    drawn = [draw_change_step("digits", "drop_rare", seed, steps) for seed in range(40)]
    assert all(CHANGE_WINDOW[0] * steps <= s <= CHANGE_WINDOW[1] * steps for s in drawn)
    assert len(set(drawn)) > 30
    assert drawn == [draw_change_step("digits", "drop_rare", seed, steps)
                     for seed in range(40)]  # a function of the seed: re-recordable
    plans = plan_runs(list(FAMILIES), ["drop_rare", "continued"],
                      RecordingConfig(steps=1000, seeds=(0, 1, 2)))
    assert all(300 <= p.change_step <= 700 for p in plans)
    assert len({p.change_step for p in plans}) > len(plans) // 2
    # Edge-of-stability controls only where a family has a rate for them.
    for scenario, optimizer in (("edge_of_stability_gd", "gd"),
                                ("edge_of_stability_adam", "adam")):
        eos = plan_runs(list(FAMILIES), [scenario], RecordingConfig(seeds=(0,)))
        assert {p.family for p in eos} == {
            f for f, s in SETTINGS.items() if s.full_batch_run(optimizer)}
        assert QUICK_FAMILY in {p.family for p in eos}


def test_the_default_recording_reports_at_least_40_controls_held_out() -> None:
    plans = plan_runs(list(FAMILIES), list(SCENARIOS_BY_NAME), RecordingConfig())
    # Every family is held out in turn, so every control run is reported held out.
    assert sum(not p.collapse for p in plans) >= 40
    assert all(p.steps >= 5000 for p in plans)


@pytest.mark.parametrize("scenario", CONTROLS)
def test_every_control_runs_the_full_length(scenario: str) -> None:
    plan = _plan(scenario)
    trace = train_run(plan)
    assert len(trace.loss) == len(trace.grad_norm) == plan.steps
    assert trace.monitor_steps == plan.steps
    assert trace.eval_steps[-1] == plan.steps - 1
    assert not trace.estimator_errors
    assert trace_ground_truth(trace) is None  # a control has no collapse to find


def test_the_adam_edge_control_trains_adam_on_one_batch_whose_rare_labels_are_clean(
) -> None:
    family = FAMILIES[QUICK_FAMILY]()
    settings = family.settings
    scenario = SCENARIOS_BY_NAME["edge_of_stability_adam"]
    run = scenario.full_batch_run(settings)
    assert run is not None and run.optimizer == "adam" and run.common_label_noise > 0
    optimizer = make_optimizer(family.make_model(), scenario, settings)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == run.learning_rate
    assert optimizer.param_groups[0]["betas"][0] == 0.9  # the agent's edge: 38 / lr
    inputs, targets = full_batch(family, scenario, torch.Generator().manual_seed(0))
    clean_inputs, clean = family.batch(run.size, settings.rare_fraction,
                                       torch.Generator().manual_seed(0))
    assert len(targets) == run.size and torch.equal(inputs, clean_inputs)
    rare = clean == family.MINORITY
    assert torch.equal(targets == family.MINORITY, rare)  # rare kept, none made rare
    # A redrawn label is wrong two times in three (three common classes).
    wrong = float((targets != clean)[~rare].float().mean())
    assert wrong == pytest.approx(run.common_label_noise * 2 / 3, abs=0.01)
    # The gradient-descent control's batch is the family's own, unchanged.
    gd = SCENARIOS_BY_NAME["edge_of_stability_gd"]
    gd_batch = full_batch(family, gd, torch.Generator().manual_seed(0))
    assert gd_batch is not None and torch.equal(gd_batch[1], family.batch(
        4096, settings.rare_fraction, torch.Generator().manual_seed(0))[1])
    assert type(make_optimizer(family.make_model(), gd, settings)) is torch.optim.SGD


def test_a_full_batch_run_is_estimated_at_its_own_measured_cost() -> None:
    [adam] = plan_runs([QUICK_FAMILY], ["edge_of_stability_adam"],
                       RecordingConfig(steps=1000, seeds=(0,)))
    [plain] = plan_runs([QUICK_FAMILY], ["continued"], RecordingConfig(steps=1000, seeds=(0,)))
    run = SETTINGS[QUICK_FAMILY].full_batch_run("adam")
    assert run is not None and run.seconds_per_1000_steps is not None
    assert estimate_seconds([adam], jobs=1) == run.seconds_per_1000_steps
    assert estimate_seconds([plain], jobs=1) == SETTINGS[QUICK_FAMILY].seconds_per_1000_steps


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(
            _same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_checkpoint_resume_continues_with_the_same_monitor_state() -> None:
    plan = _plan("checkpoint_resume")
    family = FAMILIES[QUICK_FAMILY]()
    scenario = SCENARIOS_BY_NAME[plan.scenario]
    torch.manual_seed(0)
    model = family.make_model()
    optimizer = make_optimizer(model, scenario, family.settings)
    probes = family.probes(0, 32)
    sink: list = []
    monitor = build_monitor(model, optimizer, *probes, plan, sink)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        inputs, targets = family.batch(16, family.settings.rare_fraction, generator)
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        monitor.step(loss=loss, batch=(inputs, targets))
        optimizer.step()
    saved = monitor.state_dict()
    blob = checkpoint(model, optimizer, monitor)
    monitor.close()
    new_model, new_optimizer, new_monitor = resume(blob, family, scenario, probes, plan, sink)
    assert new_model is not model and new_monitor is not monitor
    assert new_monitor.step_count == 30
    assert _same(new_monitor.state_dict(), saved)
    assert new_monitor.intervals == monitor.intervals
    assert _same(new_model.state_dict(), model.state_dict())
    assert _same(new_optimizer.state_dict(), optimizer.state_dict())
    # The resumed Monitor records into the same sink.
    recorded = len(sink)
    inputs, targets = family.batch(16, family.settings.rare_fraction, generator)
    loss = torch.nn.functional.cross_entropy(new_model(inputs), targets)
    loss.backward()
    new_monitor.step(loss=loss, batch=(inputs, targets))
    assert len(sink) > recorded and sink[-1][0] == 30
    new_monitor.close()


def test_the_trace_file_round_trips_and_rescoring_it_gives_the_same_outcome(
        tmp_path: Path) -> None:
    plan = _plan("lr_spike", steps=60, change_step=30)
    trace = train_run(plan, tmp_path)
    assert recorded(tmp_path) == {plan.file_name}
    loaded = read_trace(tmp_path / plan.file_name)
    assert loaded.plan == plan
    assert loaded.samples == trace.samples and loaded.samples
    assert (loaded.loss, loaded.grad_norm) == (trace.loss, trace.grad_norm)
    assert (loaded.eval_steps, loaded.heldout_accuracy, loaded.probe_loss) == (
        trace.eval_steps, trace.heldout_accuracy, trace.probe_loss)
    assert loaded.monitor_steps == trace.monitor_steps == plan.steps
    rules = load_rules(None)
    for detect in (lambda t: raresignal_alarms(t, rules), probe_loss_alarms):
        assert score(loaded, "d", detect(loaded)) == score(trace, "d", detect(trace))


def test_spread_measurements_keep_their_own_step_and_old_files_still_read(
        tmp_path: Path) -> None:
    plan = _plan("continued", steps=3, change_step=1)
    rare = (("probe", "rare"),)
    # Published at step 2 but taken at step 1 (spread over steps); one more at close.
    spread = [(2, "loss", (), 0.5), (1, "probe_fisher_mass", rare, 0.25)]
    late = [(2, "sharpness", (), 3.0)]
    writer = TraceWriter(tmp_path, plan)
    writer.step(0, 1.0, 0.1, [(0, "loss", (), 1.0)])
    writer.step(1, 0.9, 0.1, [])
    writer.step(2, 0.5, 0.1, spread)
    writer.late_samples(late)
    writer.end(RunTrace(plan, monitor_steps=3))
    assert read_trace(tmp_path / plan.file_name).samples == [(0, "loss", (), 1.0),
                                                             *spread, *late]
    # A file of the earlier format ([metric, labels, value], stamped by its line) reads.
    lines = [json.loads(line) for line in (tmp_path / plan.file_name).read_text().splitlines()
             if '"kind": "samples"' not in line]
    for line in lines:
        if line["kind"] == "step":
            line["samples"] = [entry[1:] for entry in line["samples"]]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_trace(old).samples == [(0, "loss", (), 1.0), (2, "loss", (), 0.5),
                                       (2, "probe_fisher_mass", rare, 0.25)]


def _write_trace(directory: Path, plan: RunPlan, probe_losses: list[float],
                 evaluated: list[float] | None = None) -> None:
    """A trace with the rare probe's loss every 5 steps (the benchmark's evaluations of
    it ``evaluated``, by default the same) and the held-out accuracy kept at 0.9 (no
    collapse), written without training."""
    writer = TraceWriter(directory, plan)
    for index, (value, exact) in enumerate(zip(probe_losses, evaluated or probe_losses,
                                               strict=True)):
        step = 5 * index
        writer.step(step, 1.0, 0.1, [(step, "probe_loss", (("probe", "rare"),), value)])
        writer.evaluation(step, 0.9, exact)
    writer.end(RunTrace(plan, monitor_steps=5 * len(probe_losses)))


def test_no_tuning_scores_the_rules_as_given_on_every_family_at_once(
        tmp_path: Path) -> None:
    import detection

    # A control on each of two families; the rare probe learned (2.0 -> 0.2), then one
    # reading 2 nats up. The raw rule cries wolf on it; the shipped median does not.
    losses = [2.0, 2.0, 2.0, 1.0, *[0.2] * 12, 2.2, 0.2, 0.2, 0.2]
    for family in ("minority_class", "digits"):
        _write_trace(tmp_path / "traces", _plan("continued", steps=100, change_step=50,
                                                family=family), losses)
    raw = tmp_path / "raw.yaml"
    raw.write_text("rules:\n  - {alert: RareProbeLossRise, metric: probe_loss, op: '>', "
                   "threshold: 0.5, relative_to: running_best, baseline: {warmup: 3}}\n")
    report = {}
    for name, rules in (("shipped", []), ("raw", ["--rules", str(raw)])):
        out = tmp_path / f"{name}.json"
        assert detection.main(["--load-traces", str(tmp_path / "traces"), "--no-tuning",
                               "--json", str(out), *rules]) == 0
        report[name] = json.loads(out.read_text())
    for figures in report.values():
        assert [(f["tuning"], sorted(f["held_out"])) for f in figures["folds"]] == [
            ([], ["digits", "minority_class"])]
        assert "rare-signal rules, tuned on other families" not in {
            o["detector"] for o in figures["outcomes"]}

    def alarmed(figures: dict) -> int:
        return sum(o["false_alarms"] > 0 for o in figures["outcomes"]
                   if o["detector"] == "rare-signal rules, shipped")

    assert (alarmed(report["shipped"]), alarmed(report["raw"])) == (0, 2)
    with pytest.raises(SystemExit, match="exclude each other"):
        detection.main(["--load-traces", str(tmp_path / "traces"), "--no-tuning",
                        "--tune-families", "digits"])


def test_probe_loss_every_replaces_the_agents_rare_readings_by_the_benchmarks(
        tmp_path: Path) -> None:
    plan = _plan("continued", steps=40, change_step=20, eval_every=5)
    rare, common = (("probe", "rare"),), (("probe", "common"),)
    agent = [(s, "probe_loss", rare, 9.0) for s in (0, 25)]
    others = [(s, "probe_loss", common, 7.0) for s in (0, 25)] + [(12, "loss", (), 1.0)]
    trace = RunTrace(plan, samples=sorted(agent + others, key=lambda x: x[0]),
                     eval_steps=list(range(0, 40, 5)), heldout_accuracy=[0.9] * 8,
                     probe_loss=[float(s) for s in range(0, 40, 5)])
    dense = with_probe_loss_every(trace, 10)
    # The evaluation after step s is the agent's reading at s + 1; its own rare readings
    # go, the common probe's and the other metrics stay.
    assert [x for x in dense.samples if x[2] == rare] == [
        (1, "probe_loss", rare, 0.0), (11, "probe_loss", rare, 10.0),
        (21, "probe_loss", rare, 20.0), (31, "probe_loss", rare, 30.0)]
    assert [x for x in dense.samples if x[2] != rare] == [x for x in trace.samples
                                                          if x[2] != rare]
    assert trace.samples == sorted(agent + others, key=lambda x: x[0])  # not modified
    with pytest.raises(ValueError, match="every 5 steps; 12 is not a multiple"):
        with_probe_loss_every(trace, 12)

    import detection

    # The agent's readings stay flat after the probe is learned; the benchmark's own
    # evaluations climb 2 nats and stay there: only a re-scoring on those alarms.
    learned = [2.0, 2.0, 2.0, 1.0, *[0.2] * 12]
    _write_trace(tmp_path / "traces", replace(plan, steps=200, change_step=100),
                 learned + [0.2] * 24, learned + [2.2] * 24)

    def alarmed(*extra: str) -> bool:
        out = tmp_path / "scored.json"
        assert detection.main(["--load-traces", str(tmp_path / "traces"), "--no-tuning",
                               "--json", str(out), *extra]) == 0
        return any(o["false_alarms"] for o in json.loads(out.read_text())["outcomes"]
                   if o["detector"] == "rare-signal rules, shipped")

    assert (alarmed(), alarmed("--probe-loss-every", "10")) == (False, True)
    with pytest.raises(SystemExit, match=r"--probe-loss-every: .* 7 is not a multiple"):
        detection.main(["--load-traces", str(tmp_path / "traces"), "--no-tuning",
                        "--probe-loss-every", "7"])


def test_a_killed_recording_resumes_by_skipping_the_runs_recorded(tmp_path: Path) -> None:
    done, todo = _plan("continued", steps=20, change_step=10), _plan("rare_thinning",
                                                                      steps=20, change_step=10)
    train_run(done, tmp_path)
    before = (tmp_path / done.file_name).stat().st_mtime_ns
    # A run killed mid-way leaves only a partial file: it is recorded again.
    (tmp_path / todo.file_name).with_suffix(".partial").write_text('{"kind": "plan"}\n')
    lines: list[str] = []
    ran = record([done, todo], tmp_path, jobs=1, report=lines.append)
    assert ran == [todo]
    assert "1 of 2 runs already recorded" in lines[0] and "estimated" in lines[0]
    assert "1/1 runs" in lines[-1]
    assert recorded(tmp_path) == {done.file_name, todo.file_name}
    assert (tmp_path / done.file_name).stat().st_mtime_ns == before
    assert not list(tmp_path.glob("*.partial"))
    assert record([done, todo], tmp_path, jobs=1, report=lines.append) == []


# (steps, change step, collapse scenario) per family: short runs in which the rare skill
# is learned before the change and lost after it.
SHORT_COLLAPSES = {
    "minority_class": (400, 200, "finetune_other_task"),
    "token_rule": (400, 200, "finetune_other_task"),
    "digits": (400, 200, "finetune_other_task"),
    "char_lm": (400, 200, "finetune_other_task"),
    "compositional_mlp": (800, 500, "finetune_other_task"),
    "pulse_cnn": (400, 200, "finetune_other_task"),
    "keyword_text": (1400, 1100, "lr_spike"),
}


@pytest.mark.parametrize("family", sorted(SHORT_COLLAPSES))
def test_each_family_learns_its_rare_skill_and_loses_it_in_a_collapse(family: str) -> None:
    steps, change, scenario = SHORT_COLLAPSES[family]
    plan = _plan(scenario, steps=steps, change_step=change, family=family, eval_every=10)
    trace = train_run(plan)
    chance = SETTINGS[family].chance
    before = [a for s, a in zip(trace.eval_steps, trace.heldout_accuracy, strict=True)
              if s < change]
    assert max(before) >= chance + LEARNED_SHARE * (1 - chance)  # learned
    truth = trace_ground_truth(trace)
    assert truth is not None and change <= truth < steps  # and lost after the change
