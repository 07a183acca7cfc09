"""The alert engine as a pure function of samples and time: baselines, `for`,
hysteresis, the hold after a resolve, deduplication and the stall clock."""

from __future__ import annotations

import statistics

import pytest

from raresignal.protos.v1 import common_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import parse_rules
from raresignal.server.storage.records import AlertChange, CheckedSample, labels_key

PENDING = common_pb2.ALERT_STATE_PENDING
FIRING = common_pb2.ALERT_STATE_FIRING
RESOLVED = common_pb2.ALERT_STATE_RESOLVED
UNSPECIFIED = common_pb2.ALERT_STATE_UNSPECIFIED

RETENTION = """
rules:
  - alert: Retention
    metric: probe_retention
    op: "<"
    threshold: 0.3
    resolve_threshold: 0.5
    for: 3
    severity: critical
    summary: "probe {probe}: {value}"
"""


def s(metric: str, step: int, value: float, **labels: str) -> CheckedSample:
    return CheckedSample(metric, labels_key(labels), step, value, 0.0)


def engine_for(text: str, interval: float = 0.0) -> AlertEngine:
    engine = AlertEngine(parse_rules(text))
    engine.track_run("r1", "run-one", interval, last_report_at=0.0)
    return engine


def feed(engine: AlertEngine, metric: str, values: list[float], start_step: int = 1,
         **labels: str) -> list[AlertChange]:
    changes = []
    for offset, value in enumerate(values):
        step = start_step + offset
        changes += engine.observe("r1", [s(metric, step, value, **labels)], now=float(step))
    return changes


def states(changes: list[AlertChange]) -> list[tuple[int, int]]:
    return [(c.previous_state, c.alert.state) for c in changes]


def test_for_counts_consecutive_evaluations_before_firing() -> None:
    engine = engine_for(RETENTION)
    changes = feed(engine, "probe_retention", [0.9, 0.2, 0.2], probe="rare")
    assert states(changes) == [(UNSPECIFIED, PENDING)]  # two bad values: still pending
    changes = feed(engine, "probe_retention", [0.2], start_step=4, probe="rare")
    assert states(changes) == [(PENDING, FIRING)]
    assert changes[0].alert.labels == {"probe": "rare"}
    assert changes[0].alert.summary == "probe rare: 0.2"


def test_a_pending_alert_that_recovers_resolves_without_firing() -> None:
    engine = engine_for(RETENTION)
    changes = feed(engine, "probe_retention", [0.2, 0.2, 0.9], probe="rare")
    assert states(changes) == [(UNSPECIFIED, PENDING), (PENDING, RESOLVED)]
    assert changes[-1].alert.fired_at == 0.0
    assert engine.active_alerts() == []


def test_hysteresis_keeps_firing_between_fire_and_resolve_thresholds() -> None:
    engine = engine_for(RETENTION)
    feed(engine, "probe_retention", [0.1, 0.1, 0.1], probe="rare")
    # 0.4 is above the fire threshold (0.3) but below the resolve threshold (0.5).
    assert feed(engine, "probe_retention", [0.4, 0.45, 0.35], start_step=4, probe="rare") == []
    assert [a.state for a in engine.active_alerts()] == [FIRING]
    changes = feed(engine, "probe_retention", [0.5], start_step=7, probe="rare")
    assert states(changes) == [(FIRING, RESOLVED)]
    assert changes[0].alert.resolved_at == 7.0


def test_one_episode_per_series_and_a_new_one_after_resolving() -> None:
    engine = engine_for(RETENTION)
    first = feed(engine, "probe_retention", [0.1] * 6, probe="rare")
    assert len({c.alert.alert_id for c in first}) == 1  # no duplicates while it persists
    assert states(first) == [(UNSPECIFIED, PENDING), (PENDING, FIRING)]
    other = feed(engine, "probe_retention", [0.1] * 3, start_step=1, probe="other")
    assert {c.alert.alert_id for c in other}.isdisjoint({c.alert.alert_id for c in first})
    # Resolved at step 7, then five quiet evaluations run the hold out: a new episode.
    feed(engine, "probe_retention", [0.9] * 6, start_step=7, probe="rare")
    second = feed(engine, "probe_retention", [0.1] * 3, start_step=13, probe="rare")
    assert second[0].alert.alert_id != first[0].alert.alert_id


def test_a_step_is_evaluated_once() -> None:
    engine = engine_for(RETENTION)
    feed(engine, "probe_retention", [0.1, 0.1], probe="rare")
    # The same steps again (a replay of samples) do not advance the `for` count.
    assert feed(engine, "probe_retention", [0.1, 0.1], start_step=1, probe="rare") == []
    assert [a.state for a in engine.active_alerts()] == [PENDING]


RATIO = """
rules:
  - alert: Collapse
    metric: probe_fisher_mass_ratio
    op: "<"
    threshold: 0.2
    relative_to: baseline_ratio
    resolve_threshold: 0.3
    for: 1
    baseline: {warmup: 2, window: 5, smoothing: 1.0}
"""


def test_baseline_is_the_median_of_the_window_after_warmup() -> None:
    engine = engine_for(RATIO)
    warmup = [100.0, 0.001]  # ignored: a warm-up value that low would otherwise fire
    window = [1.0, 2.0, 4.0, 3.0, 10.0]
    assert feed(engine, "probe_fisher_mass_ratio", warmup + window, probe="rare") == []
    state = engine.state("r1", 'Collapse/fire/probe_fisher_mass_ratio/{"probe":"rare"}')
    assert state is not None
    assert state.median == statistics.median(window) == 3.0
    assert state.mad == statistics.median(abs(x - 3.0) for x in window) == 1.0
    # Boundaries: fire below 0.2 x 3 = 0.6, resolve at 0.3 x 3 = 0.9 or above.
    assert feed(engine, "probe_fisher_mass_ratio", [0.61], start_step=8, probe="rare") == []
    changes = feed(engine, "probe_fisher_mass_ratio", [0.59], start_step=9, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    assert changes[0].alert.threshold == pytest.approx(0.6, rel=1e-12)  # float product
    assert feed(engine, "probe_fisher_mass_ratio", [0.89], start_step=10, probe="rare") == []
    assert states(feed(engine, "probe_fisher_mass_ratio", [0.9], start_step=11,
                       probe="rare")) == [(FIRING, RESOLVED)]


def test_ewma_smoothing_feeds_the_baseline_window() -> None:
    engine = engine_for(RATIO.replace("smoothing: 1.0", "smoothing: 0.5"))
    feed(engine, "probe_fisher_mass_ratio", [9.0, 9.0, 2.0, 4.0, 4.0, 8.0, 0.0], probe="p")
    state = engine.state("r1", 'Collapse/fire/probe_fisher_mass_ratio/{"probe":"p"}')
    assert state is not None
    smoothed = [2.0, 3.0, 3.5, 5.75, 2.875]  # s_t = 0.5 x_t + 0.5 s_(t-1), exact in binary
    assert state.median == statistics.median(smoothed)


MAD = """
rules:
  - alert: Drift
    metric: subspace_overlap
    op: "<"
    threshold: 5
    relative_to: baseline_mad
    resolve_threshold: 3
    baseline: {warmup: 0, window: 5, smoothing: 1.0, mad_floor_fraction: 0.0}
"""


def test_mad_rule_fires_more_than_k_mads_below_the_median() -> None:
    engine = engine_for(MAD)
    feed(engine, "subspace_overlap", [0.80, 0.82, 0.84, 0.86, 0.88])  # median .84, MAD .02
    # Fire boundary 0.84 - 5 x 0.02 = 0.74; resolve at 0.84 - 3 x 0.02 = 0.78.
    assert feed(engine, "subspace_overlap", [0.745], start_step=6) == []
    assert states(feed(engine, "subspace_overlap", [0.735], start_step=7)) == [
        (UNSPECIFIED, FIRING)]
    assert feed(engine, "subspace_overlap", [0.775], start_step=8) == []
    assert states(feed(engine, "subspace_overlap", [0.785], start_step=9)) == [
        (FIRING, RESOLVED)]


WHILE = """
rules:
  - alert: Absorbed
    metric: probe_bulk_residual
    op: "<"
    threshold: 0.1
    resolve_threshold: 0.15
    while: {metric: probe_loss, op: ">=", threshold: 0.95, relative_to: baseline_ratio}
    baseline: {warmup: 0, window: 2, smoothing: 1.0}
"""


def test_while_condition_must_hold_on_the_matching_series() -> None:
    engine = engine_for(WHILE)
    feed(engine, "probe_loss", [2.0, 2.0], probe="rare")  # baseline median 2.0
    feed(engine, "probe_loss", [1.0], start_step=3, probe="rare")  # improving: 1.0 < 1.9
    assert feed(engine, "probe_bulk_residual", [0.05], start_step=3, probe="rare") == []
    feed(engine, "probe_loss", [1.95], start_step=4, probe="rare")  # not improving
    assert feed(engine, "probe_bulk_residual", [0.05], start_step=4, probe="other") == []
    changes = feed(engine, "probe_bulk_residual", [0.05], start_step=4, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]


def test_while_metric_is_read_fresh_when_both_arrive_at_one_step() -> None:
    engine = engine_for(WHILE)
    feed(engine, "probe_loss", [2.0, 2.0], probe="rare")
    both = [s("probe_bulk_residual", 3, 0.05, probe="rare"), s("probe_loss", 3, 2.5,
                                                                  probe="rare")]
    assert states(engine.observe("r1", both, now=3.0)) == [(UNSPECIFIED, FIRING)]


# A floor well under the learned window, so the tests below exercise the learned part.
STALL = """
rules:
  - alert: RunStalled
    stall: {step_time_factor: 20, step_time_quantile: 0.95, floor_seconds: 30, history: 64,
            learn_after: 8}
"""
STEP_SECONDS = 5.0  # learned window: 20 x 5 s = 100 s
HEARTBEAT_SECONDS = 10.0
FROZEN = "its step stopped advancing"
SILENT = "nothing was heard from it"


class FakeRun:
    """A training run as the engine sees it: reports as steps advance, heartbeats while
    they do not, and the server's clock ticking every second."""

    def __init__(self, engine: AlertEngine) -> None:
        self.engine, self.now, self.step = engine, 0.0, 0
        self.changes: list[AlertChange] = []

    def train(self, steps: int, seconds_per_step: float = STEP_SECONDS) -> None:
        for _ in range(steps):
            self.wait(seconds_per_step, heartbeats=True)
            self.step += 1
            self.changes += self.engine.observe("r1", [s("step", self.step, self.step)],
                                                now=self.now)

    def wait(self, seconds: float, heartbeats: bool) -> None:
        """The step stays put for ``seconds``; the process heartbeats if it lives."""
        silent_since = self.now
        for _ in range(int(seconds)):
            self.now += 1.0
            if heartbeats and self.now - silent_since >= HEARTBEAT_SECONDS:
                silent_since = self.now
                self.changes += self.engine.heartbeat("r1", self.step, now=self.now)
            self.changes += self.engine.tick(now=self.now)

    def take(self) -> list[AlertChange]:
        changes, self.changes = self.changes, []
        return changes


def stalled_run(interval: float = 1.0) -> FakeRun:
    run = FakeRun(engine_for(STALL, interval=interval))
    run.train(20)
    assert run.take() == []
    return run


def test_a_validation_pause_of_ten_step_times_does_not_stall() -> None:
    run = stalled_run()
    run.wait(10 * STEP_SECONDS, heartbeats=True)  # past the floor, inside the learned window
    run.train(5)
    run.wait(10 * STEP_SECONDS, heartbeats=True)
    assert run.take() == []


def test_a_hung_loop_fires_although_heartbeats_arrive_and_resolves_on_the_next_step(
) -> None:
    run = stalled_run()
    run.wait(20 * STEP_SECONDS, heartbeats=True)  # exactly the window: not beyond it
    assert run.take() == []
    run.wait(1, heartbeats=True)
    (fired,) = run.take()
    assert states([fired]) == [(UNSPECIFIED, FIRING)]
    assert fired.alert.threshold == 20 * STEP_SECONDS and fired.alert.step == 20
    assert FROZEN in fired.alert.summary
    run.wait(300, heartbeats=True)
    assert run.take() == []  # the same episode
    run.train(1)
    assert states(run.take()) == [(FIRING, RESOLVED)]


def test_a_dead_process_fires_when_nothing_is_heard_for_the_window() -> None:
    run = stalled_run()
    run.wait(20 * STEP_SECONDS, heartbeats=False)
    assert run.take() == []
    run.wait(1, heartbeats=False)
    (fired,) = run.take()
    assert states([fired]) == [(UNSPECIFIED, FIRING)]
    assert SILENT in fired.alert.summary and fired.alert.value == 20 * STEP_SECONDS + 1
    run.train(1)  # a restarted process resumes the run
    assert states(run.take()) == [(FIRING, RESOLVED)]


def test_the_window_follows_the_runs_own_pace() -> None:
    run = FakeRun(engine_for(STALL, interval=1.0))
    run.train(20, seconds_per_step=1.0)  # fast steps: the floor, 30 s, is the window
    run.wait(30, heartbeats=True)
    assert run.take() == []
    run.wait(1, heartbeats=True)
    assert states(run.take()) == [(UNSPECIFIED, FIRING)]


def test_a_frozen_step_counts_only_once_the_pace_is_learned() -> None:
    run = FakeRun(engine_for(STALL, interval=1.0))
    run.train(7)  # one advance short of learn_after
    run.wait(1000, heartbeats=True)  # e.g. a first step that compiles for minutes
    assert run.take() == []
    run.wait(20 * STEP_SECONDS + 1, heartbeats=False)  # silence counts from the start
    fired = run.take()
    assert states(fired) == [(UNSPECIFIED, FIRING)] and SILENT in fired[0].alert.summary


def test_a_run_without_a_wall_clock_never_stalls() -> None:
    run = FakeRun(engine_for(STALL, interval=0.0))  # a replay: report interval 0
    run.train(20)
    run.wait(1000, heartbeats=False)
    assert run.take() == []


def test_heartbeats_for_a_closed_run_change_nothing() -> None:
    run = stalled_run()
    run.engine.close_run("r1", now=run.now)
    run.wait(1000, heartbeats=True)
    assert run.take() == []


def test_closing_a_run_resolves_its_alerts_and_stops_the_clock() -> None:
    engine = engine_for(STALL + RETENTION.replace("rules:\n", ""), interval=1.0)
    feed(engine, "probe_retention", [0.1] * 3, probe="rare")
    changes = engine.close_run("r1", now=4.0)
    assert states(changes) == [(FIRING, RESOLVED)]
    assert engine.tick(now=1000.0) == []


def test_state_survives_a_round_trip_through_storage_form() -> None:
    engine = engine_for(RETENTION)
    feed(engine, "probe_retention", [0.1, 0.1], probe="rare")
    writes = engine.take_writes()
    restored = AlertEngine(parse_rules(RETENTION))
    restored.track_run("r1", "run-one", 0.0, last_report_at=0.0)
    restored.restore(writes.rule_states, [a for a in writes.alerts if a.state == PENDING])
    changes = restored.observe("r1", [s("probe_retention", 3, 0.1, probe="rare")], now=3.0)
    assert states(changes) == [(PENDING, FIRING)]  # the third consecutive evaluation
    assert changes[0].alert.alert_id == writes.alerts[0].alert_id


SMOOTHED = RETENTION.replace("    for: 3\n", "    for: 1\n    smoothing: 0.5\n")


def test_a_smoothing_rule_compares_the_ewma_of_its_values() -> None:
    engine = engine_for(SMOOTHED)
    # One low value among high ones: raw 0.1 would fire; the EWMA (0.9, 0.5, 0.7, 0.8)
    # does not.
    assert feed(engine, "probe_retention", [0.9, 0.1, 0.9, 0.9], probe="rare") == []
    # A sustained fall: the EWMA goes 0.45, then 0.275 < 0.3 fires.
    changes = feed(engine, "probe_retention", [0.1, 0.1, 0.1], start_step=5, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    assert changes[0].alert.step == 6
    assert changes[0].alert.value == pytest.approx(0.275)  # the value compared, smoothed
    state = engine.state("r1", 'Retention/fire/probe_retention/{"probe":"rare"}')
    assert state is not None and state.last_value == 0.1  # raw, for `while` conditions
    assert type(state).from_dict(state.to_dict()).evaluated == pytest.approx(0.1875)
    # The unsmoothed rule on the same values fires at the lone low value.
    raw = engine_for(RETENTION.replace("    for: 3\n", "    for: 1\n"))
    assert states(feed(raw, "probe_retention", [0.9, 0.1], probe="rare"))[0][1] == FIRING


BELOW_BASELINE_AND_NEGATIVE = """
defaults:
  baseline: {warmup: 0, window: 4, smoothing: 1}
rules:
  - alert: Undone
    metric: probe_interference
    op: "<"
    threshold: 3
    relative_to: baseline_mad
    resolve_threshold: 3
    for: 1
    summary: "{probe}: {value}"
    while: {metric: probe_interference, op: "<", threshold: 0}
"""


def test_a_while_on_the_rules_own_metric_reads_the_same_sample() -> None:
    engine = engine_for(BELOW_BASELINE_AND_NEGATIVE)
    # Baseline median 0.3, MAD 0.1: the fire boundary is 0.3 - 3 x 0.1 = 0.
    feed(engine, "probe_interference", [0.2, 0.4, 0.2, 0.4], probe="rare")
    # -0.05 is below both boundaries at once: it fires on this very sample, not the next.
    changes = feed(engine, "probe_interference", [-0.05], start_step=5, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    # A positive value right after a negative one: the `while` reads this sample (0.15,
    # not negative), not the one before (-0.1), so nothing fires. Baseline median 0.3,
    # MAD 0.1: the fire boundary at 1 MAD is 0.2.
    engine = engine_for(BELOW_BASELINE_AND_NEGATIVE.replace("threshold: 3\n", "threshold: 1\n"))
    assert feed(engine, "probe_interference", [0.3, 0.5, 0.3, -0.1, 0.15], probe="rare") == []


IGNORING_COMMON = RETENTION.replace(
    "    for: 3\n", "    for: 1\n    ignore_labels: {probe: [common, reference]}\n")


def test_a_rule_leaves_the_series_it_ignores_alone() -> None:
    engine = engine_for(IGNORING_COMMON)
    # The same collapse on three probes: only the one the rule does not ignore alerts,
    # and the ignored ones keep no state either.
    for probe in ("common", "reference", "rare"):
        changes = feed(engine, "probe_retention", [0.9, 0.1], probe=probe)
        assert [c.alert.labels for c in changes] == ([{"probe": "rare"}]
                                                     if probe == "rare" else []), probe
    assert engine.state("r1", 'Retention/fire/probe_retention/{"probe":"common"}') is None
    assert engine.state("r1", 'Retention/fire/probe_retention/{"probe":"rare"}') is not None


# -- the hold: a resolved alert that relapses is the same episode ----------------------

# Fires below 0.3 at once, resolves at 0.5 or more; the hold is the default (5).
FLAPPING = RETENTION.replace("    for: 3\n", "    for: 1\n")
DRIFT = [0.2, 0.6] * 6  # a series drifting back and forth across the threshold


def test_a_flapping_series_is_one_episode() -> None:
    engine = engine_for(FLAPPING)
    changes = feed(engine, "probe_retention", DRIFT, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING), (FIRING, RESOLVED)] + [
        (RESOLVED, FIRING), (FIRING, RESOLVED)] * 5
    assert len({c.alert.alert_id for c in changes}) == 1
    # The episode keeps the time it first fired; a firing record has no resolve time.
    refired = [c.alert for c in changes if c.alert.state == FIRING]
    assert {(a.started_at, a.fired_at) for a in refired} == {(1.0, 1.0)}
    assert {a.resolved_at for a in refired} == {0.0}
    assert [a.step for a in refired] == [1, 3, 5, 7, 9, 11]


def test_a_relapse_within_the_hold_needs_for_evaluations_and_fires_the_same_alert() -> None:
    engine = engine_for(RETENTION)  # for: 3
    first = feed(engine, "probe_retention", [0.1] * 3 + [0.9, 0.9], probe="rare")
    assert states(first)[-1] == (FIRING, RESOLVED)
    # Two low values are a relapse shorter than `for`: nothing fires, nothing goes pending.
    assert feed(engine, "probe_retention", [0.1, 0.1, 0.9], start_step=6, probe="rare") == []
    changes = feed(engine, "probe_retention", [0.1] * 3, start_step=9, probe="rare")
    assert states(changes) == [(RESOLVED, FIRING)]
    assert changes[0].alert.alert_id == first[0].alert.alert_id
    assert changes[0].at == 11.0 and changes[0].alert.fired_at == 3.0
    assert engine.active_alerts() == [changes[0].alert]


@pytest.mark.parametrize(("quiet", "same_episode"), [(4, True), (5, False)])
def test_the_episode_ends_after_hold_evaluations_without_the_condition(
        quiet: int, same_episode: bool) -> None:
    engine = engine_for(FLAPPING)
    first = feed(engine, "probe_retention", [0.1, 0.9], probe="rare")
    feed(engine, "probe_retention", [0.9] * quiet, start_step=3, probe="rare")
    changes = feed(engine, "probe_retention", [0.1], start_step=3 + quiet, probe="rare")
    assert (changes[0].alert.alert_id == first[0].alert.alert_id) is same_episode
    assert states(changes) == [(RESOLVED if same_episode else UNSPECIFIED, FIRING)]


def test_hold_zero_ends_the_episode_at_the_resolve() -> None:
    engine = engine_for(FLAPPING.replace("    for: 1\n", "    for: 1\n    hold: 0\n"))
    changes = feed(engine, "probe_retention", [0.1, 0.9, 0.1], probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING), (FIRING, RESOLVED),
                               (UNSPECIFIED, FIRING)]
    assert changes[0].alert.alert_id != changes[2].alert.alert_id


def test_a_pending_alert_that_never_fired_is_not_held() -> None:
    engine = engine_for(RETENTION)
    changes = feed(engine, "probe_retention", [0.1, 0.9, 0.1], probe="rare")
    assert states(changes) == [(UNSPECIFIED, PENDING), (PENDING, RESOLVED),
                               (UNSPECIFIED, PENDING)]
    assert changes[0].alert.alert_id != changes[2].alert.alert_id


def test_closing_a_run_ends_a_held_episode() -> None:
    engine = engine_for(FLAPPING)
    first = feed(engine, "probe_retention", [0.1, 0.9], probe="rare")
    assert engine.close_run("r1", now=3.0) == []  # nothing open: the alert already resolved
    engine.track_run("r1", "run-one", 0.0, last_report_at=3.0)  # resumed
    changes = feed(engine, "probe_retention", [0.1], start_step=3, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    assert changes[0].alert.alert_id != first[0].alert.alert_id


def restarted(engine: AlertEngine, text: str, stored: list) -> AlertEngine:
    """A new engine restored from what ``engine`` wrote, as the server restores it."""
    rule_states: dict[tuple[str, str], dict] = {}
    alerts: dict[str, object] = {}
    for writes in stored:
        rule_states.update({(run, key): data for run, key, data in writes.rule_states})
        alerts.update({a.alert_id: a for a in writes.alerts})
    fresh = AlertEngine(parse_rules(text))
    fresh.track_run("r1", "run-one", 0.0, last_report_at=0.0)
    fresh.restore([(run, key, data) for (run, key), data in rule_states.items()],
                  [a for a in alerts.values() if a.state in (PENDING, FIRING)])
    return fresh


def test_a_hold_survives_a_restart() -> None:
    engine = engine_for(FLAPPING)
    first = feed(engine, "probe_retention", [0.1, 0.9, 0.9], probe="rare")  # 1 of 5 quiet
    stored = [engine.take_writes()]
    # Restored twice from the same writes: a relapse inside the hold, and a run-out hold.
    relapse = restarted(engine, FLAPPING, stored)
    changes = feed(relapse, "probe_retention", [0.9] * 3 + [0.1], start_step=4, probe="rare")
    assert states(changes) == [(RESOLVED, FIRING)]
    assert (changes[0].alert.alert_id, changes[0].alert.started_at,
            changes[0].alert.fired_at) == (first[0].alert.alert_id, 1.0, 1.0)
    assert changes[0].alert.summary == "probe rare: 0.1"
    ran_out = restarted(engine, FLAPPING, stored)
    changes = feed(ran_out, "probe_retention", [0.9] * 4 + [0.1], start_step=4, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    assert changes[0].alert.alert_id != first[0].alert.alert_id


def test_state_written_before_holds_existed_still_loads() -> None:
    engine = engine_for(FLAPPING)
    feed(engine, "probe_retention", [0.9], probe="rare")
    (run_id, key, data), = engine.take_writes().rule_states
    for field in ("hold_left", "started_at", "fired_at"):
        del data[field]
    fresh = AlertEngine(parse_rules(FLAPPING))
    fresh.track_run("r1", "run-one", 0.0, last_report_at=0.0)
    fresh.restore([(run_id, key, data)], [])
    changes = feed(fresh, "probe_retention", [0.1], start_step=2, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]


PROBE_LOSS_RISE = """
rules:
  - alert: ProbeLossRise
    metric: probe_loss
    op: ">"
    threshold: 0.5
    relative_to: running_best
    resolve_threshold: 0.25
    for: 1
    hold: 0
    baseline: {warmup: 2}
    severity: critical
    summary: "probe {probe}: {value:.2f} above {threshold:.2f}"
"""


# Readings every step: a median over the last 2 steps is one of three readings.
MEDIAN_OF_THREE = PROBE_LOSS_RISE.replace("    for: 1\n",
                                          "    for: 1\n    median_over_steps: 2\n")


def test_a_median_of_three_ignores_one_outlying_reading_and_follows_a_lasting_climb(
) -> None:
    learned = [3.0, 2.9, 2.0, 1.0, 0.3, 0.3]
    # One reading 3 nats up, then back: the raw rule fires, the median (0.3) does not
    # move. One reading far down does not set the best either: 0.3 stays the best.
    spike = [*learned, 3.3, 0.3, 0.3, 0.0, 0.3, 0.3]
    assert states(feed(engine_for(PROBE_LOSS_RISE), "probe_loss", spike, probe="r"))[0] == (
        UNSPECIFIED, FIRING)
    engine = engine_for(MEDIAN_OF_THREE)
    assert feed(engine, "probe_loss", spike, probe="r") == []
    state = engine.state("r1", 'ProbeLossRise/fire/probe_loss/{"probe":"r"}')
    assert state is not None and state.best == 0.3 and state.recent == [0.0, 0.3, 0.3]
    assert state.recent_steps == [10, 11, 12]
    # A lasting climb: the median passes best + 0.5 at the climb's second reading.
    changes = feed(engine, "probe_loss", [0.9, 0.9, 0.9], start_step=13, probe="r")
    assert states(changes) == [(UNSPECIFIED, FIRING)] and changes[0].alert.step == 14
    assert changes[0].alert.value == pytest.approx(0.9)


def test_the_recent_readings_of_a_median_survive_the_storage_round_trip() -> None:
    engine = engine_for(MEDIAN_OF_THREE)
    feed(engine, "probe_loss", [3.0, 2.9, 2.0, 1.0, 0.3, 0.3, 0.9], probe="r")
    restored = restarted(engine, MEDIAN_OF_THREE, [engine.take_writes()])
    # Median of (0.3, 0.9, 0.9) = 0.9: fires on the first reading after the restart.
    changes = feed(restored, "probe_loss", [0.9], start_step=8, probe="r")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    # A rule without a median keeps no recent readings in its stored state.
    plain = engine_for(PROBE_LOSS_RISE)
    feed(plain, "probe_loss", [3.0, 2.9], probe="r")
    assert all(data["recent"] is None and data["recent_steps"] is None
               for _, _, data in plain.take_writes().rule_states)


def _every(engine: AlertEngine, interval: int, values: list[float], start: int = 0
           ) -> list[AlertChange]:
    """The rare probe's loss read every ``interval`` steps from step ``start``."""
    changes = []
    for index, value in enumerate(values):
        step = start + interval * index
        changes += engine.observe("r1", [s("probe_loss", step, value, probe="r")],
                                  now=float(step))
    return changes


MEDIAN_OVER_50_STEPS = PROBE_LOSS_RISE.replace("    for: 1\n",
                                               "    for: 1\n    median_over_steps: 50\n")


@pytest.mark.parametrize("interval", [10, 25])
def test_a_median_over_steps_means_the_same_at_any_cadence(interval: int) -> None:
    # The probe learned, then one reading 3 nats up, at a reading every 10 or every 25
    # steps: the median of the last 50 steps (6 or 3 readings) does not move.
    learned = [3.0, 2.9, 2.0, 1.0, *[0.3] * 8]
    engine = engine_for(MEDIAN_OVER_50_STEPS)
    assert _every(engine, interval, [*learned, 3.3, *[0.3] * 5], start=0) == []
    # A lasting climb: fires once half the window's readings are up, 30 or 25 steps in.
    after = interval * (len(learned) + 6)
    changes = _every(engine, interval, [0.9] * 6, start=after)
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    assert changes[0].alert.step - after == {10: 30, 25: 25}[interval]


def test_recent_readings_stored_without_their_steps_start_the_window_again() -> None:
    # A state stored by a server whose median counted readings: its readings carry no
    # steps, so the window starts again from the next reading instead of failing.
    engine = engine_for(MEDIAN_OVER_50_STEPS)
    _every(engine, 10, [3.0, 2.9, 2.0, 1.0, 0.3, 0.3])
    (run_id, key, data), = engine.take_writes().rule_states
    data["recent"], data["recent_steps"] = [0.3, 0.3, 0.3], None
    fresh = engine_for(MEDIAN_OVER_50_STEPS)
    fresh.restore([(run_id, key, data)], [])
    _every(fresh, 10, [0.4], start=60)
    state = fresh.state("r1", key)
    assert state is not None and (state.recent, state.recent_steps) == ([0.4], [60])


BEST_OF_100_STEPS = PROBE_LOSS_RISE.replace("    for: 1\n",
                                            "    for: 1\n    best_over_steps: 100\n")


def test_a_best_over_steps_lets_a_slow_drift_pass_and_catches_a_climb() -> None:
    # Learned to 0.2, then a drift of 0.1 nats per 100 steps: 1 nat over 1000 steps,
    # which the run-long best takes for a loss; the best of the last 100 steps does not.
    learned = [3.0, 2.9, 2.0, 1.0, 0.2]
    drift = [0.2 + 0.01 * i for i in range(1, 101)]
    assert states(_every(engine_for(PROBE_LOSS_RISE), 10, learned + drift))[0] == (
        UNSPECIFIED, FIRING)
    engine = engine_for(BEST_OF_100_STEPS)
    assert _every(engine, 10, learned + drift) == []
    key = 'ProbeLossRise/fire/probe_loss/{"probe":"r"}'
    state = engine.state("r1", key)
    assert state is not None and state.best == 0.2  # the run-long best, for `gained`
    assert state.best_to_compare(100) == pytest.approx(1.1)  # the best of steps 940-1040
    # A climb of 0.6 nats within 20 steps fires (1.7 at step 1060 against 1.12).
    changes = _every(engine, 10, [1.5, 1.7, 1.9], start=1050)
    assert [(c.previous_state, c.alert.state, c.alert.step) for c in changes] == [
        (UNSPECIFIED, FIRING, 1060)]
    # While the alert is open its best stands still: a loss that stays up stays firing,
    # long after the climb has left the window, and resolves back near that best.
    assert _every(engine, 10, [1.9] * 30, start=1080) == []
    assert engine.state("r1", key).best_to_compare(100) == pytest.approx(1.12)
    assert states(_every(engine, 10, [1.3], start=1380)) == [(FIRING, RESOLVED)]


def test_a_best_over_steps_survives_the_storage_round_trip() -> None:
    engine = engine_for(BEST_OF_100_STEPS)
    _every(engine, 10, [3.0, 2.9, 2.0, 1.0, 0.2, 0.5, 0.4])
    restored = restarted(engine, BEST_OF_100_STEPS, [engine.take_writes()])
    # The window's best (0.2, at step 40) is kept: 0.75 at step 70 is 0.55 above it.
    assert states(_every(restored, 10, [0.75], start=70)) == [(UNSPECIFIED, FIRING)]


def test_running_best_follows_the_loss_down_and_fires_on_a_climb_back() -> None:
    engine = engine_for(PROBE_LOSS_RISE)
    # The warm-up's values (3.0, 2.9) set nothing; the best follows the loss as it learns,
    # so a loss still far above where it started never fires.
    assert feed(engine, "probe_loss", [3.0, 2.9, 2.0, 1.2, 0.6, 0.3, 0.2, 0.5],
                probe="rare") == []
    assert engine.state("r1", 'ProbeLossRise/fire/probe_loss/{"probe":"rare"}').best == 0.2
    changes = feed(engine, "probe_loss", [0.75], start_step=9, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    assert changes[0].alert.summary == "probe rare: 0.75 above 0.70"
    # Hysteresis: still firing above best + 0.25, resolved at or below it.
    assert feed(engine, "probe_loss", [0.5], start_step=10, probe="rare") == []
    assert states(feed(engine, "probe_loss", [0.45], start_step=11, probe="rare")) == [
        (FIRING, RESOLVED)]


def test_running_best_of_a_falling_metric_is_its_highest_value() -> None:
    engine = engine_for(PROBE_LOSS_RISE.replace('op: ">"', 'op: "<"')
                        .replace("metric: probe_loss", "metric: probe_accuracy")
                        .replace("resolve_threshold: 0.25", "resolve_threshold: 0.5"))
    assert feed(engine, "probe_accuracy", [0.1, 0.2, 0.3, 0.9, 0.7], probe="rare") == []
    changes = feed(engine, "probe_accuracy", [0.3], start_step=6, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]


def test_running_best_survives_the_storage_round_trip() -> None:
    from raresignal.server.alerting.engine import SeriesState

    state = SeriesState(seen=2, best=0.25, last_step=7)
    assert SeriesState.from_dict(state.to_dict()) == state


def test_running_best_rejects_a_negative_distance() -> None:
    from raresignal.server.alerting.rules import RulesError

    with pytest.raises(RulesError, match="distance from the best value"):
        parse_rules(PROBE_LOSS_RISE.replace("threshold: 0.5", "threshold: -0.5"))


def _shipped_rule_changes(metric: str, values: list[float]) -> list[AlertChange]:
    from raresignal.server.alerting.rules import load_rules

    engine = AlertEngine(load_rules())
    engine.track_run("r1", "run-one", 0.0, last_report_at=0.0)
    return feed(engine, metric, values)


def test_the_edge_of_stability_raises_no_sharpness_alert() -> None:
    # A tanh MLP under full-batch GD at lr 0.4, its loss falling 0.77 -> 0.07: the ratio
    # rises to the edge and oscillates about it (the measured 1.57, 1.22, 1.08 among them).
    edge = [0.4, 0.7, 0.9, 1.0, 1.57, 1.22, 1.08, 0.97, 1.3, 1.1, 0.95, 1.45, 1.0, 1.05]
    changes = _shipped_rule_changes("sharpness_ratio", edge)
    assert [c for c in changes if c.alert.rule == "SharpnessAboveStability"] == []


def test_sharpness_held_far_past_the_edge_raises_a_warning() -> None:
    changes = _shipped_rule_changes("sharpness_ratio", [0.9, 1.0, 1.1, 2.5, 3.0, 3.5, 4.0, 4.5])
    fired = [c.alert for c in changes if c.alert.rule == "SharpnessAboveStability"
             and c.alert.state == FIRING]
    assert len(fired) == 1 and fired[0].severity == "warning"


def test_running_best_waits_until_the_value_gained_the_margin() -> None:
    # A skill not yet learned: its loss drifts up from where it started (the model grows
    # sure of the other classes) and has never gained 0.5 nats, so nothing is being lost.
    engine = engine_for(PROBE_LOSS_RISE)
    assert feed(engine, "probe_loss", [2.0, 2.0, 2.0, 2.1, 2.4, 2.8, 3.2], probe="rare") == []
    # Once learned (the best 0.5 nats below the start), a climb back fires.
    changes = feed(engine, "probe_loss", [1.0, 0.4, 1.2], start_step=8, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]


PROBE_LOSS_DOUBLING = """
rules:
  - alert: ProbeLossDoubling
    metric: probe_loss
    op: ">"
    threshold: 2.0
    relative_to: trailing_ratio
    gained: 0.5
    resolve_threshold: 1.5
    for: 1
    hold: 0
    baseline: {warmup: 0, window: 3}
"""


def test_a_trailing_ratio_rule_with_gained_waits_until_the_value_gained_the_margin(
) -> None:
    # A slice not yet learned: its loss doubles over its recent median as the model grows
    # sure of the other classes, but it never fell 0.5 nats below its start: quiet.
    engine = engine_for(PROBE_LOSS_DOUBLING)
    assert feed(engine, "probe_loss", [1.0, 1.0, 1.0, 2.5, 2.4, 2.3], probe="rare") == []
    # Learned (0.05, 0.95 below the start), then doubled over its recent median: fires.
    assert feed(engine, "probe_loss", [0.05, 0.05, 0.05], start_step=7, probe="rare") == []
    changes = feed(engine, "probe_loss", [0.11], start_step=10, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    # The same series under the rule without `gained` fires on the unlearned doubling.
    plain = engine_for(PROBE_LOSS_DOUBLING.replace("    gained: 0.5\n", ""))
    assert states(feed(plain, "probe_loss", [1.0, 1.0, 1.0, 2.5], probe="rare")) == [
        (UNSPECIFIED, FIRING)]


TRAILING = """
rules:
  - alert: UpdateSurge
    metric: update_to_weight_ratio
    op: ">"
    threshold: 4.0
    relative_to: trailing_ratio
    resolve_threshold: 2.0
    for: 1
    hold: 0
    baseline: {warmup: 1, window: 3}
"""


def test_a_trailing_ratio_compares_with_the_median_of_the_previous_window() -> None:
    engine = engine_for(TRAILING)
    # Warm-up (100.0) skipped; then three values fill the window before any is compared.
    assert feed(engine, "update_to_weight_ratio", [100.0, 1.0, 2.0, 3.0]) == []
    # 7.9 < 4 x median(1, 2, 3) = 8; the window moves on to (2, 3, 7.9): median 3.
    assert feed(engine, "update_to_weight_ratio", [7.9], start_step=5) == []
    changes = feed(engine, "update_to_weight_ratio", [12.5], start_step=6)
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    state = engine.state("r1", "UpdateSurge/fire/update_to_weight_ratio/{}")
    assert state is not None and state.median == 3.0 and state.window == [3.0, 7.9, 12.5]


def test_a_trailing_ratio_follows_a_slow_climb_that_a_frozen_baseline_flags() -> None:
    # A learning-rate warm-up: the ratio grows 10 x over 40 readings, never 4 x in 3.
    climb = [1.0 + 0.25 * i for i in range(40)]
    assert feed(engine_for(TRAILING), "update_to_weight_ratio", climb) == []
    frozen = TRAILING.replace("trailing_ratio", "baseline_ratio")
    assert feed(engine_for(frozen), "update_to_weight_ratio", climb) != []


def test_the_trailing_window_survives_the_storage_round_trip() -> None:
    engine = engine_for(TRAILING)
    feed(engine, "update_to_weight_ratio", [100.0, 1.0, 2.0, 3.0])
    restored = restarted(engine, TRAILING, [engine.take_writes()])
    changes = restored.observe("r1", [s("update_to_weight_ratio", 5, 8.5)], now=5.0)
    assert states(changes) == [(UNSPECIFIED, FIRING)]


LOSS_RISE_ON_SURGE = """
rules:
  - alert: LossRiseOnSurge
    metric: probe_loss
    op: ">"
    threshold: 0.1
    relative_to: running_best
    gained: 0.5
    resolve_threshold: 0.05
    for: 1
    hold: 0
    baseline: {warmup: 1}
    while:
      metric: update_to_weight_ratio
      op: ">"
      threshold: 4.0
      relative_to: trailing_ratio
      baseline: {warmup: 0, window: 3}
"""


def test_a_while_with_its_own_baseline_and_a_gained_margin_apart_from_the_threshold(
) -> None:
    engine = engine_for(LOSS_RISE_ON_SURGE)
    feed(engine, "update_to_weight_ratio", [1.0, 1.0, 1.0])  # the trailing window, full
    # Learned only 0.3 nats below the start (gained: 0.5), so a 0.2 rise is not a loss.
    feed(engine, "probe_loss", [2.0, 2.0, 1.7], start_step=1, probe="rare")
    feed(engine, "update_to_weight_ratio", [9.0], start_step=4)
    assert feed(engine, "probe_loss", [1.9], start_step=4, probe="rare") == []
    # Learned (best 1.0, 1.0 below the start); a 0.2 rise with the updates calm: quiet.
    feed(engine, "probe_loss", [1.0], start_step=5, probe="rare")
    feed(engine, "update_to_weight_ratio", [1.0, 1.0, 1.0, 1.0], start_step=5)
    assert feed(engine, "probe_loss", [1.2], start_step=9, probe="rare") == []
    # The same rise while the updates surge 9 x their trailing median: fires, though
    # far under the 0.5 the rule would need to have gained as its own threshold.
    feed(engine, "update_to_weight_ratio", [9.0], start_step=10)
    changes = feed(engine, "probe_loss", [1.2], start_step=10, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    # The rule's own baseline spec (warm-up 1) is not the while metric's (warm-up 0).
    rule = parse_rules(LOSS_RISE_ON_SURGE)[0]
    assert rule.baseline.warmup == 1 and rule.while_baseline is not None
    assert (rule.while_baseline.warmup, rule.while_baseline.window) == (0, 3)


SUSTAINED_SURGE = LOSS_RISE_ON_SURGE.replace(
    "      baseline: {warmup: 0, window: 3}\n",
    "      baseline: {warmup: 0, window: 3}\n      for: 2\n")


def test_a_while_with_for_needs_the_condition_on_consecutive_readings() -> None:
    engine = engine_for(SUSTAINED_SURGE)
    feed(engine, "update_to_weight_ratio", [1.0, 1.0, 1.0])
    feed(engine, "probe_loss", [2.0, 1.0, 1.0], probe="rare")  # learned: best 1.0
    # One surging reading (a catapult) with the probe's loss up: quiet.
    feed(engine, "update_to_weight_ratio", [9.0], start_step=4)
    assert feed(engine, "probe_loss", [1.3], start_step=4, probe="rare") == []
    # The surge back down, then up again: the count starts over, still quiet.
    feed(engine, "update_to_weight_ratio", [1.0, 9.0], start_step=5)
    assert feed(engine, "probe_loss", [1.3], start_step=6, probe="rare") == []
    # A second surging reading in a row (40 > 4 x the median of 9, 1, 9): it fires.
    feed(engine, "update_to_weight_ratio", [40.0], start_step=7)
    changes = feed(engine, "probe_loss", [1.3], start_step=7, probe="rare")
    assert states(changes) == [(UNSPECIFIED, FIRING)]
    # Without `for` the first surging reading was enough.
    single = engine_for(LOSS_RISE_ON_SURGE)
    feed(single, "update_to_weight_ratio", [1.0, 1.0, 1.0])
    feed(single, "probe_loss", [2.0, 1.0, 1.0], probe="rare")
    feed(single, "update_to_weight_ratio", [9.0], start_step=4)
    assert states(feed(single, "probe_loss", [1.3], start_step=4, probe="rare")) == [
        (UNSPECIFIED, FIRING)]


def _shipped_surge_run(probe_losses_after: list[float], restart: bool = False,
                       surge_readings: int | None = None, held_at: float = 0.2,
                       surge: float = 10.0) -> list[AlertChange]:
    """The shipped rules on a run whose rare probe learned (2.0 -> ``held_at`` nats) under calm
    updates (a ratio of 1e-3 for 60 readings), after which the updates surge ``surge`` x while
    the probe's loss takes ``probe_losses_after``; the agent's cadences: the ratio every
    10 steps, the probe's loss every 25. With ``restart`` the surge is a warm restart's:
    the learning rate back at the peak it had before decaying tenfold, so the ratio at
    the peak rate (the agent's rescaling) stays flat while the raw ratio jumps. With
    ``surge_readings`` only that many ratio readings surge (a catapult)."""
    from raresignal.server.alerting.rules import load_rules

    engine = AlertEngine(load_rules())
    engine.track_run("r1", "run-one", 0.0, last_report_at=0.0)
    losses = [2.0, 2.0, 2.0, 1.5, 1.0, 0.5, 0.3, *[held_at] * 17, *probe_losses_after]
    changes: list[AlertChange] = []
    for step in range(0, 25 * len(losses), 5):
        batch = []
        if step % 10 == 0:
            surging = step >= 600 and (surge_readings is None
                                       or step < 600 + 10 * surge_readings)
            raw = 1e-3 * (surge if surging else 1.0)
            batch += [s("update_to_weight_ratio", step, raw),
                      s("update_to_weight_ratio_at_peak_lr", step, 1e-2 if restart else raw)]
        if step % 25 == 0:
            batch.append(s("probe_loss", step, losses[step // 25], probe="rare"))
        if batch:
            changes += engine.observe("r1", batch, now=float(step))
    return [c for c in changes if c.alert.state == FIRING]


def test_the_shipped_surge_rule_fires_on_a_small_rise_while_updates_surge() -> None:
    fired = _shipped_surge_run([0.35, 0.45, 0.55, 0.6])
    # The loss is 0.15 above its best at step 600 already, but the surge has lasted one
    # ratio reading (600); by the next probe reading (625) it has lasted three: fires.
    # RareProbeLossRise needs 0.5 nats and stays quiet. At 625 the loss is also past
    # twice its recent median (0.45 against 0.2), the surge two readings old: the jump
    # rule fires with it.
    assert [(c.alert.rule, c.alert.step) for c in fired] == [
        ("RareProbeLossRiseOnUpdateSurge", 625), ("RareProbeLossJumpOnUpdateSurge", 625)]


def test_the_jump_rule_warns_on_a_confident_probe_that_no_margin_in_nats_sees() -> None:
    # A skill held at 0.01 nats: the loss creeps to 0.015 and 0.03 while the updates
    # surge, then the skill is gone (8 nats). Neither margin in nats (0.1 over the best,
    # 0.45 over the best) is crossed before that reading; twice the recent median is, at
    # 625 (0.03 against 0.01), the surge two readings old by then.
    fired = _shipped_surge_run([0.015, 0.03, 8.0], held_at=0.01)
    # The finer margin in nats sees it one reading later, with the skill gone, as does
    # the spike rule (8 nats, 800 x the median).
    assert [(c.alert.rule, c.alert.step) for c in fired] == [
        ("RareProbeLossJumpOnUpdateSurge", 625), ("RareProbeLossRiseOnUpdateSurge", 650),
        ("RareProbeLossSpikeOnUpdateSurge", 650)]
    # The same creep with calm updates (a surge of 2 x, under the rule's 4 x) is noise.
    assert [c.alert.rule for c in _shipped_surge_run([0.015, 0.03], held_at=0.01,
                                                     surge=2.0)] == []


def test_a_catapult_raises_no_jump_alert() -> None:
    # One surging ratio reading with the probe's loss ten times its median at the same
    # step (a catapult at the edge of stability), then settling: the surge did not last
    # two readings, so the jump rule stays quiet, and ten times is short of the spike
    # rule's twenty.
    assert _shipped_surge_run([0.1, 0.01, 0.01, 0.01], held_at=0.01,
                              surge_readings=1) == []


def test_a_skill_lost_at_the_first_surging_reading_raises_the_spike_alert() -> None:
    # The surge's first ratio reading (600) and, at the same step, the probe's loss at 30
    # times its median: the skill went within one reading. The spike rule fires there;
    # the jump rule a reading later (the surge two readings old), as does the finer
    # margin in nats.
    fired = _shipped_surge_run([0.3, 0.5, 0.5], held_at=0.01)
    assert [(c.alert.rule, c.alert.step) for c in fired][:1] == [
        ("RareProbeLossSpikeOnUpdateSurge", 600)]
    assert ("RareProbeLossJumpOnUpdateSurge", 625) in [(c.alert.rule, c.alert.step)
                                                       for c in fired]
    # The same spike with calm updates (a surge of 2 x) is not a change of course.
    assert "RareProbeLossSpikeOnUpdateSurge" not in [
        c.alert.rule for c in _shipped_surge_run([0.3, 0.5, 0.5], held_at=0.01, surge=2.0)]


def test_a_catapult_raises_no_rare_signal_alert() -> None:
    # Full-batch training at the edge of stability: updates far larger than the rest for
    # two readings and one probe reading 3 nats up, then settling back. Neither the surge
    # rule (the surge lasted two readings) nor RareProbeLossRise (a median) fires.
    settling = [3.4, 0.35, 0.2, 0.2]
    assert _shipped_surge_run(settling, surge_readings=2) == []
    # The same probe readings while the updates stay large: the surge rule fires on
    # the second (0.15 above the best, the surge three readings old).
    assert [(c.alert.rule, c.alert.step) for c in _shipped_surge_run(settling)] == [
        ("RareProbeLossRiseOnUpdateSurge", 625)]


def test_the_shipped_surge_rule_reads_the_ratio_at_the_peak_learning_rate() -> None:
    # The same small rise at a warm restart: the raw ratio jumps tenfold, the ratio at
    # the run's peak rate does not, and the rule stays quiet.
    assert _shipped_surge_run([0.35, 0.45, 0.55, 0.6], restart=True) == []


def test_the_shipped_surge_rule_is_quiet_when_the_probe_gains_in_the_surge() -> None:
    # A slice learned, or a schedule step: the updates surge as much, the loss falls.
    assert _shipped_surge_run([0.18, 0.15, 0.12, 0.1]) == []
