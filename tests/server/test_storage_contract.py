"""What every storage backend promises, checked on SQLite and on a real PostgreSQL.

Each test gets ``open_store``: a function that opens a storage on the test's own database,
so calling it again is a server restart on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from postgres_cluster import Cluster
from server_support import batch, sample

from raresignal.protos.v1 import ingest_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.serving.auth import EVERYONE
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
from raresignal.server.serving.validation import RequestError
from raresignal.server.storage.base import RetentionPolicy, SequenceConflict, Storage
from raresignal.server.storage.records import (
    AlertChange,
    AlertRecord,
    BatchGroup,
    BatchWrite,
    CheckedSample,
    EngineWrites,
    RunRecord,
    newest_by_series,
)
from raresignal.server.storage.sqlite import SQLiteStorage

OpenStore = Callable[..., Storage]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[Storage] = []
    if request.param == "sqlite":
        def make(retention: RetentionPolicy | None = None) -> Storage:
            return SQLiteStorage(str(tmp_path / "x.db"), retention)
    else:
        from raresignal.server.storage.postgres import PostgresStorage

        cluster: Cluster = request.getfixturevalue("postgres_cluster")
        dbname = request.getfixturevalue("postgres_db")

        def make(retention: RetentionPolicy | None = None) -> Storage:
            return PostgresStorage(cluster.admin_conninfo(dbname), retention)

    def tracked(retention: RetentionPolicy | None = None) -> Storage:
        store = make(retention)
        opened.append(store)
        return store

    yield tracked
    for store in opened:
        store.close()


def run_record(run_id: str, created_at: float = 1.0, finished_at: float = 0.0,
               last_step: int = 0) -> RunRecord:
    return RunRecord(run_id=run_id, run_name="name-" + run_id, state=1, world_size=2,
                     created_at=created_at, updated_at=created_at, last_step=last_step,
                     report_interval_seconds=1.5, config={"lr": "0.1"}, tags={"t": "x"},
                     agent_version="1.2", finished_at=finished_at)


def write(run: RunRecord, sequence: int, samples: list[CheckedSample],
          sender: str = "s") -> tuple[BatchWrite, set[tuple[str, str]]]:
    """A batch write and the series it names (new or not: the storage sorts that out)."""
    newest = newest_by_series(samples)
    return BatchWrite(run, sender, sequence, samples, EngineWrites(), newest), set(newest)


def group_of(*writes: tuple[BatchWrite, set[tuple[str, str]]]) -> BatchGroup:
    group = BatchGroup()
    for batch_write, series in writes:
        group.add(batch_write, series)
    return group


def loss(step: int, value: float, **labels: str) -> CheckedSample:
    key = "{}" if not labels else ("{" + ",".join(f'"{k}":"{v}"' for k, v in
                                                 sorted(labels.items())) + "}")
    return CheckedSample("loss", key, step, value, 1000.0 + step)


def open_ledger(store: Storage) -> tuple[Ledger, str]:
    """A ledger (no alert rules) on ``store``, and the id of a run it opened."""
    ledger = Ledger(store, AlertEngine([]), LiveState())
    run, _ = ledger.open_run(ingest_pb2.OpenRunRequest(run_name="n", world_size=1), EVERYONE)
    return ledger, run.run_id


def report(ledger: Ledger, run_id: str, sequence: int, steps: range | list[int]) -> bool:
    """Reports ``loss`` = step at each step, as sender "s"; whether it was applied."""
    losses = [sample("loss", step, float(step)) for step in steps]
    return ledger.apply(batch(run_id, sequence, losses, sender="s"), EVERYONE).applied


def test_runs_are_stored_updated_and_listed_oldest_first(open_store: OpenStore) -> None:
    store = open_store()
    store.create_run(run_record("b", created_at=2.0))
    store.create_run(run_record("a", created_at=1.0))
    store.create_run(run_record("c", created_at=3.0, finished_at=4.0))
    updated = run_record("b", created_at=2.0, last_step=77)
    updated.tags = {"t": "y"}
    store.update_run(updated)
    assert [r.run_id for r in store.list_runs(include_finished=True)] == ["a", "b", "c"]
    assert [r.run_id for r in store.list_runs(include_finished=False)] == ["a", "b"]
    store.close()
    reopened = open_store()
    assert reopened.list_runs(include_finished=True)[1] == updated


def test_each_sequence_is_applied_once_and_survives_a_restart(open_store: OpenStore) -> None:
    ledger, run_id = open_ledger(open_store())
    assert report(ledger, run_id, 5, [1])
    assert not report(ledger, run_id, 5, [2])
    assert not report(ledger, run_id, 4, [3])
    ledger.close()
    reopened = open_store()
    assert reopened.last_sequences(run_id) == {"s": 5}
    assert reopened.last_sequence(run_id, "s") == 5
    assert reopened.last_sequence(run_id, "other") == 0
    ledger = Ledger(reopened, AlertEngine([]), LiveState())
    assert not report(ledger, run_id, 5, [4])  # a replay after the restart
    assert report(ledger, run_id, 6, [5])
    assert [p.step for p in reopened.get_series(run_id, "loss", "{}", 0)] == [1, 5]


def test_series_samples_and_latest_values(open_store: OpenStore) -> None:
    store = open_store()
    run = run_record("r")
    store.create_run(run)
    # Steps out of order, two label sets, and step 3 twice in one group: the later wins.
    first = [loss(3, 0.5, layer="a"), loss(1, 0.1, layer="a"), loss(2, 9.0)]
    second = [loss(3, 0.75, layer="a"), loss(4, 4.0)]
    store.apply_group(group_of(write(run, 1, first), write(run, 2, second)))
    a_key = '{"layer":"a"}'
    assert set(store.series_keys("r")) == {("loss", a_key), ("loss", "{}")}
    assert [(p.step, p.value, p.wall_time) for p in store.get_series("r", "loss", a_key, 0)] \
        == [(1, 0.1, 1001.0), (3, 0.75, 1003.0)]
    assert [p.step for p in store.get_series("r", "loss", "{}", 3)] == [4]
    assert store.get_series("r", "loss", '{"layer":"zz"}', 0) == []
    # A later group re-reporting stored steps replaces them beside a new step, and an
    # older step does not move the latest value back.
    store.apply_group(group_of(write(run, 3, [loss(1, 0.2, layer="a"), loss(4, 5.0),
                                              loss(5, 6.0)])))
    assert [p.value for p in store.get_series("r", "loss", a_key, 0)] == [0.2, 0.75]
    assert [(p.step, p.value) for p in store.get_series("r", "loss", "{}", 0)] == [
        (2, 9.0), (4, 5.0), (5, 6.0)]
    store.close()
    reopened = open_store()
    latest = {(v.run_id, v.metric, v.labels_key): (v.step, v.value, v.wall_time)
              for v in reopened.latest_values()}
    assert latest == {("r", "loss", a_key): (3, 0.75, 1003.0),
                      ("r", "loss", "{}"): (5, 6.0, 1005.0)}
    assert set(reopened.series_keys("r")) == {("loss", a_key), ("loss", "{}")}


def test_stored_numbers_read_back_exactly(open_store: OpenStore) -> None:
    store = open_store()
    run = run_record("r")
    store.create_run(run)
    # Values no short decimal writes exactly, the extremes a sample may take, and the
    # largest step.
    values = [0.1 + 0.2, 1 / 3, 5e-324, -1.7976931348623157e308, 2.0**-1074 * 3]
    samples = [CheckedSample("loss", "{}", step, value, 1_700_000_000.123456789 + step / 7)
               for step, value in enumerate(values)]
    samples.append(CheckedSample("loss", "{}", 10**12, math.pi, math.e * 1e9))
    store.apply_group(group_of(write(run, 1, samples)))
    assert [(p.step, p.value, p.wall_time) for p in store.get_series("r", "loss", "{}", 0)] \
        == [(s.step, s.value, s.wall_time) for s in samples]
    (latest,) = store.latest_values("r")
    assert (latest.step, latest.value, latest.wall_time) == (10**12, math.pi, math.e * 1e9)


def test_sqlite_retention_bounds_a_long_series_and_keeps_recent_steps_whole(
        tmp_path: Path) -> None:
    # SQLite's own bound: PostgreSQL drops whole days instead (test_sample_partitions.py).
    policy = RetentionPolicy(full_resolution=100, thinned_capacity=50)
    store = SQLiteStorage(str(tmp_path / "x.db"), policy)
    ledger, run_id = open_ledger(store)
    for sequence in range(1, 201):  # 2,000 steps in batches of 10
        assert report(ledger, run_id, sequence, range((sequence - 1) * 10, sequence * 10))
    points = store.get_series(run_id, "loss", "{}", 0)
    steps = [p.step for p in points]
    assert len(steps) <= policy.limit
    assert steps[-100:] == list(range(1900, 2000))  # the newest at full resolution
    assert steps[0] == 0  # the oldest survives thinning, so the whole history is spanned
    assert all(p.value == float(p.step) for p in points)  # thinning never mixes values


def _alert(alert_id: str, run_id: str, state: int, started_at: float,
           rule: str = "collapse") -> AlertRecord:
    return AlertRecord(alert_id=alert_id, run_id=run_id, run_name="n", rule=rule,
                       labels={"layer": "a"}, state=state, severity="warning",
                       summary="s", value=1.5, threshold=1.0, step=7, started_at=started_at)


def test_engine_writes_and_alerts(open_store: OpenStore) -> None:
    store = open_store()
    run = run_record("r")
    other = run_record("o")
    store.create_run(run)
    store.create_run(other)
    first = _alert("a1", "r", 1, 10.0)
    writes = EngineWrites(
        rule_states=[("r", "collapse|{}", {"ema": 1.0}), ("r", "collapse|{}", {"ema": 2.0})],
        alerts=[first, _alert("a2", "r", 2, 20.0, rule="spike"), _alert("a3", "o", 1, 15.0)],
        changes=[AlertChange(first, 0, 10.0)])
    store.update_run(run, writes)
    # A later write of an alert replaces it; samples and engine writes commit together.
    fired = _alert("a1", "r", 2, 10.0)
    fired.fired_at = 11.0
    group = group_of(write(run, 1, [loss(1, 1.0)]))
    group.engine_writes = EngineWrites(alerts=[fired], changes=[AlertChange(fired, 1, 11.0)])
    store.apply_group(group)
    store.close()
    reopened = open_store()
    assert list(reopened.rule_states()) == [("r", "collapse|{}", {"ema": 2.0})]
    assert [a.alert_id for a in reopened.alerts()] == ["a2", "a3", "a1"]  # newest first
    assert [a.alert_id for a in reopened.alerts(run_id="r")] == ["a2", "a1"]
    assert [a.alert_id for a in reopened.alerts(states=(2,))] == ["a2", "a1"]
    assert [a.alert_id for a in reopened.alerts(rule="collapse", states=(1, 2))] == [
        "a3", "a1"]
    assert [a.alert_id for a in reopened.alerts(limit=1)] == ["a2"]
    assert reopened.alerts(run_id="r", rule="spike")[0] == _alert("a2", "r", 2, 20.0,
                                                                    rule="spike")
    assert [a for a in reopened.alerts() if a.alert_id == "a1"] == [fired]


def test_a_failing_group_stores_nothing_and_the_next_one_works(open_store: OpenStore) -> None:
    store = open_store()
    run = run_record("r")
    store.create_run(run)
    store.apply_group(group_of(write(run, 1, [loss(1, 1.0)])))
    # The second batch names a run that does not exist: its series breaks the foreign key
    # after the first batch's samples, sequence and new series were already written.
    ghost = run_record("ghost")
    group = group_of(write(run, 2, [loss(2, 2.0), loss(2, 2.0, layer="new")]),
                     write(ghost, 1, [loss(9, 1.0)]))
    group.engine_writes = EngineWrites(alerts=[_alert("x", "r", 1, 1.0)])
    with pytest.raises(Exception):  # noqa: B017 - each backend's own integrity error
        store.apply_group(group)
    reopened = open_store()
    for current in (store, reopened):
        assert current.last_sequences("r") == {"s": 1}
        assert current.last_sequence("ghost", "s") == 0
        assert set(current.series_keys("r")) == {("loss", "{}")}
        assert [p.step for p in current.get_series("r", "loss", "{}", 0)] == [1]
        assert current.alerts() == []
        assert [(v.run_id, v.step) for v in current.latest_values()] == [("r", 1)]
    reopened.close()
    # The storage's caches were rolled back too: the retried batch goes in whole.
    store.apply_group(group_of(write(run, 2, [loss(2, 2.0), loss(2, 2.0, layer="new")])))
    assert [p.step for p in store.get_series("r", "loss", '{"layer":"new"}', 0)] == [2]
    assert store.last_sequences("r") == {"s": 2}


def test_two_writers_never_apply_one_batch_twice(postgres_cluster: Cluster,
                                                 postgres_db: str) -> None:
    from raresignal.server.storage.postgres import PostgresStorage

    conninfo = postgres_cluster.admin_conninfo(postgres_db)
    first, second = PostgresStorage(conninfo), PostgresStorage(conninfo)
    run = run_record("r")
    first.create_run(run)
    first.apply_group(group_of(write(run, 1, [loss(1, 1.0)])))
    # The second writer has not seen sequence 1 committed, so its own check passes; the
    # database's does not, and nothing of the group is stored, not even its other sender.
    assert second.last_sequence("r", "s") == 0
    replay = group_of(write(run, 1, [loss(1, 99.0), loss(2, 99.0)]),
                      write(run, 1, [loss(3, 99.0)], sender="other"))
    with pytest.raises(SequenceConflict, match="'s'"):
        second.apply_group(replay)
    assert [(p.step, p.value) for p in first.get_series("r", "loss", "{}", 0)] == [(1, 1.0)]
    assert first.last_sequences("r") == {"s": 1}
    # The conflict taught the second writer the committed sequence: the ledger on it now
    # acknowledges the replay as a duplicate instead of failing it again.
    assert second.last_sequences("r") == {"s": 1}
    second.apply_group(group_of(write(run, 2, [loss(2, 2.0)])))
    assert [p.step for p in first.get_series("r", "loss", "{}", 0)] == [1, 2]
    first.close()
    second.close()


def test_a_report_from_a_stale_copy_does_not_reopen_a_run_closed_elsewhere(
        postgres_cluster: Cluster, postgres_db: str) -> None:
    from raresignal.server.storage.postgres import PostgresStorage

    conninfo = postgres_cluster.admin_conninfo(postgres_db)
    closing, reporting = PostgresStorage(conninfo), PostgresStorage(conninfo)
    run = run_record("r")
    closing.create_run(run)
    reporting.apply_group(group_of(write(run, 1, [loss(1, 1.0)])))
    closing.update_run(replace(run_record("r", finished_at=5.0), state=2))
    # The reporting replica still holds the open copy of the run: its report is stored,
    # its position advances, and the run stays closed.
    stale = run_record("r", last_step=7)  # open, as the reporting replica last saw it
    reporting.apply_group(group_of(write(stale, 2, [loss(7, 2.0)])))
    stored = closing.run("r")
    assert stored is not None and stored.finished_at == 5.0 and stored.state == 2
    assert stored.last_step == 7
    assert [p.step for p in closing.get_series("r", "loss", "{}", 0)] == [1, 7]
    closing.close()
    reporting.close()


def _newest_first(alerts: list[AlertRecord]) -> list[str]:
    return [a.alert_id for a in sorted(alerts, key=lambda a: (-a.started_at, a.alert_id))]


def test_alert_pages_resume_after_their_last_alert(open_store: OpenStore) -> None:
    store = open_store()
    for run_id in ("r", "o"):
        store.create_run(run_record(run_id))
    # Four alerts share each started_at, so pages end inside ties the alert_id breaks.
    alerts = [_alert(f"a{i:02d}", "o" if i % 3 == 0 else "r", 1 + i % 3, float(i // 4))
              for i in range(30)]
    store.update_run(run_record("r"), EngineWrites(alerts=alerts))
    everything = store.alerts(limit=100)
    assert [a.alert_id for a in everything] == _newest_first(alerts)
    read: list[str] = []
    after = None
    while page := store.alerts(limit=7, after=after):
        read += [a.alert_id for a in page]
        after = (page[-1].started_at, page[-1].alert_id)
        if len(read) == 14:
            # Written between pages: one newer than the position (belongs to pages already
            # read, so not repeated), one older (still ahead, so read once).
            store.update_run(run_record("r"), EngineWrites(
                alerts=[_alert("newer", "r", 1, 100.0), _alert("older", "r", 1, -1.0)]))
    assert read == [a.alert_id for a in everything] + ["older"]

    own = [a for a in alerts if a.run_id == "o"]
    assert [a.alert_id for a in store.alerts(run_ids=["o"], limit=100)] == _newest_first(own)
    first = store.alerts(run_ids=["o"], limit=4)
    rest = store.alerts(run_ids=["o"], limit=100,
                        after=(first[-1].started_at, first[-1].alert_id))
    assert [a.alert_id for a in first + rest] == _newest_first(own)
    assert store.alerts(run_ids=[], limit=100) == []
    assert store.alerts(run_id="r", run_ids=["o"], limit=100) == []
    assert [a.alert_id for a in store.alerts(run_ids=["o", "r"], states=(1,), limit=100)] == \
        _newest_first([a for a in alerts if a.state == 1] + [_alert("older", "r", 1, -1.0)]
                      + [_alert("newer", "r", 1, 100.0)])


def test_series_reads_stop_at_their_limit(open_store: OpenStore) -> None:
    store = open_store()
    run = run_record("r")
    store.create_run(run)
    store.apply_group(group_of(write(run, 1, [loss(step, 0.5) for step in range(10)])))
    assert [p.step for p in store.get_series("r", "loss", "{}", 3, limit=4)] == [3, 4, 5, 6]
    assert [p.step for p in store.get_series("r", "loss", "{}", 8, limit=4)] == [8, 9]
    assert len(store.get_series("r", "loss", "{}", 0)) == 10


def test_series_list_pages_resume_after_their_last_series(open_store: OpenStore) -> None:
    store = open_store()
    ledger, run_id = open_ledger(store)
    other, _ = ledger.open_run(ingest_pb2.OpenRunRequest(run_name="o", world_size=1),
                               EVERYONE)
    samples = [sample("loss", 1, 1.0), sample("grad_norm", 1, 2.0),
               *(sample("fisher_trace", 1, 3.0, group=f"g{i}") for i in range(5))]
    assert ledger.apply(batch(run_id, 1, samples, sender="s"), EVERYONE).applied
    assert ledger.apply(batch(other.run_id, 1, [sample("sharpness", 1, 1.0)], sender="s"),
                        EVERYONE).applied
    every = ledger.list_series(run_id, EVERYONE)
    assert every == sorted([("loss", "{}"), ("grad_norm", "{}"),
                            *(("fisher_trace", f'{{"group":"g{i}"}}') for i in range(5))])
    first = ledger.list_series(run_id, EVERYONE, limit=3)
    rest = ledger.list_series(run_id, EVERYONE, after=first[-1], limit=100)
    assert first + rest == every
    ledger.close()
    reopened = Ledger(open_store(), AlertEngine([]), LiveState())
    assert reopened.list_series(run_id, EVERYONE) == every
    assert reopened.list_series(other.run_id, EVERYONE) == [("sharpness", "{}")]
    with pytest.raises(RequestError) as unknown:
        reopened.list_series("0" * 16, EVERYONE)
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    reopened.close()


def test_a_run_keeps_its_newest_resolved_alerts_and_every_open_one(
        open_store: OpenStore) -> None:
    store = open_store(RetentionPolicy(alerts_per_run=2))
    run, other = run_record("r"), run_record("o")
    store.create_run(run)
    store.create_run(other)
    store.update_run(run, EngineWrites(alerts=[_alert("open", "r", 2, 1.0),
                                               _alert("o1", "o", 3, 2.0)]))
    for i in range(5):
        resolved = _alert(f"a{i}", "r", 3, 10.0 + i)
        store.update_run(run, EngineWrites(alerts=[resolved],
                                           changes=[AlertChange(resolved, 2, 10.0 + i)]))
    assert [a.alert_id for a in store.alerts(run_id="r")] == ["a4", "a3", "open"]
    assert [a.alert_id for a in store.alerts(run_id="o")] == ["o1"]
    if isinstance(store, SQLiteStorage):  # the transitions of deleted alerts go with them
        history = store._db.execute("SELECT DISTINCT alert_id FROM alert_history").fetchall()
        assert sorted(row[0] for row in history) == ["a3", "a4"]


def test_engine_state_and_latest_values_are_read_per_run(open_store: OpenStore) -> None:
    store = open_store()
    runs = [run_record("r"), run_record("o")]
    for run in runs:
        store.create_run(run)
    store.update_run(runs[0], EngineWrites(rule_states=[
        ("r", "k1", {"ema": 1.0}), ("o", "k2", {"ema": 2.0})]))
    store.apply_group(group_of(write(runs[0], 1, [loss(1, 1.0)]),
                               write(runs[1], 1, [loss(2, 2.0)])))
    assert [s[:2] for s in store.rule_states("o")] == [("o", "k2")]
    assert {s[0] for s in store.rule_states()} == {"r", "o"}
    assert [(v.run_id, v.step) for v in store.latest_values("r")] == [("r", 1)]
    assert store.latest_values("nobody") == []
    assert {v.run_id for v in store.latest_values()} == {"r", "o"}
