"""A token scoped to a few runs lists their alerts by index: another team's alert storm
is never read, however large. Checked on what SQLite executes (its plan and the number
of virtual-machine steps) and PostgreSQL (the rows its plan read), on the ledger's
storage call, and through a real server."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from postgres_cluster import Cluster
from server_support import Client, config
from stored_alerts import store_alerts

from raresignal.protos.v1 import alerts_pb2, common_pb2
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.serving.app import start_in_thread
from raresignal.server.serving.auth import Principal
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
from raresignal.server.storage.base import AlertPosition
from raresignal.server.storage.records import AlertRecord, EngineWrites, RunRecord
from raresignal.server.storage.sqlite import SQLiteStorage, alerts_query

OTHER_RUNS = 200
ALERTS_PER_OTHER_RUN = 100
OTHER_ALERTS = OTHER_RUNS * ALERTS_PER_OTHER_RUN
OWN_ALERTS = 30
TOKENS = {"team-a-token": ["teamA-*"], "admin-token": ["*"]}


@pytest.fixture(scope="module")
def storm_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A database where team B's runs hold 20k alerts and team A's one run holds 30."""
    path = tmp_path_factory.mktemp("storm") / "raresignal.db"
    store = SQLiteStorage(str(path))
    own = store_alerts(store, "teamA-run", OWN_ALERTS, run_index=0)
    for index in range(1, OTHER_RUNS + 1):
        store_alerts(store, f"teamB-{index}", ALERTS_PER_OTHER_RUN, run_index=index)
    store.close()
    with sqlite3.connect(path) as conn:
        # Statistics are what lead SQLite's planner to walk every alert in page order
        # instead of sorting one run's; the query must not depend on their absence.
        conn.execute("ANALYZE")
    yield path, own


def _executed(path: Path, run_ids: Sequence[str] | None, limit: int,
              after: AlertPosition | None = None) -> tuple[str, int, int]:
    """The plan of the storage's alert query, the virtual-machine steps it took and the
    rows it returned."""
    query, params = alerts_query("", (), "", limit, run_ids, after)
    conn = sqlite3.connect(path)
    try:
        plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query, params))
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn.set_progress_handler(count, 1)
        rows = conn.execute(query, params).fetchall()
        return plan, steps, len(rows)
    finally:
        conn.close()


def test_a_scoped_query_searches_its_runs_by_index(storm_db: tuple[Path, str]) -> None:
    path, own = storm_db
    plan, steps, rows = _executed(path, [own], limit=11)
    assert rows == 11
    assert "SEARCH alerts USING COVERING INDEX alerts_page_by_run (run_id=?)" in plan
    assert "SCAN alerts" not in plan
    # Visiting every other alert would take at least one step each.
    assert steps < OTHER_ALERTS


def test_a_deep_page_starts_at_its_position(storm_db: tuple[Path, str]) -> None:
    path, _ = storm_db
    with sqlite3.connect(path) as conn:
        started_at, alert_id = conn.execute(
            "SELECT started_at, alert_id FROM alerts ORDER BY started_at DESC, alert_id "
            "LIMIT 1 OFFSET ?", (OTHER_ALERTS,)).fetchone()
    plan, steps, rows = _executed(path, None, limit=20, after=(started_at, alert_id))
    assert rows == 20
    assert "COVERING INDEX alerts_page_by_start" in plan
    assert steps < OTHER_ALERTS  # an OFFSET would step over every alert before it


def test_a_scope_of_many_runs_reads_a_page_from_each_not_all_their_alerts(
        storm_db: tuple[Path, str]) -> None:
    path, _ = storm_db
    team_b = [f"{index:016x}" for index in range(1, OTHER_RUNS + 1)]
    plan, steps, rows = _executed(path, team_b, limit=11)
    assert rows == 11
    assert "SEARCH alerts USING COVERING INDEX alerts_page_by_run (run_id=?)" in plan
    # The index gives each run's alerts in page order, so each run's walk stops once the
    # page is full; sorting all of team B's alerts took ten steps per alert.
    assert steps < OTHER_ALERTS


TEAM_RUNS = 100
ALERTS_PER_TEAM_RUN = 100


@pytest.fixture(scope="module")
def team_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One team's runs, one after another in time, and their ids oldest first (the order
    a scope is gathered in)."""
    path = tmp_path_factory.mktemp("team") / "raresignal.db"
    store = SQLiteStorage(str(path))
    run_ids = []
    for index in range(TEAM_RUNS):
        run_id = f"{index:016x}"
        run = RunRecord(run_id=run_id, run_name=f"team-{index}",
                        state=common_pb2.RUN_STATE_COMPLETED, world_size=1,
                        created_at=1000.0 * index, updated_at=1000.0 * index, last_step=0,
                        report_interval_seconds=0.0, finished_at=1000.0 * index + 999)
        store.create_run(run)
        store.update_run(run, EngineWrites(alerts=[
            AlertRecord(alert_id=f"{index:08x}{i:08x}", run_id=run_id,
                        run_name=run.run_name, rule="R", labels={},
                        state=common_pb2.ALERT_STATE_RESOLVED, severity="warning",
                        summary="s", value=1.0, threshold=0.5, step=i,
                        started_at=1000.0 * index + i)
            for i in range(ALERTS_PER_TEAM_RUN)]))
        run_ids.append(run_id)
    store.close()
    return path, run_ids


@pytest.mark.parametrize("limit", [11, 1001])
def test_a_page_of_a_long_lived_team_stops_at_each_older_run(
        team_db: tuple[Path, list[str]], limit: int) -> None:
    path, run_ids = team_db
    store = SQLiteStorage(str(path))
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        store._db.set_progress_handler(count, 1)
        listed = [a.alert_id for a in store.alerts(run_ids=run_ids, limit=limit)]
        walked_newest_first, steps = steps, 0
        # The same page walking the runs in the order the scope came in: oldest first.
        store._db.execute(*alerts_query("", (), "", limit, run_ids, None)).fetchall()
        walked_as_given = steps
    finally:
        store.close()
    # Newest first, a full page ends every older run's walk at its first alert; oldest
    # first, every alert of the team goes through the sort.
    assert walked_newest_first < walked_as_given / 2, (walked_newest_first, walked_as_given)
    newest = [f"{index:08x}{i:08x}" for index in reversed(range(TEAM_RUNS))
              for i in reversed(range(ALERTS_PER_TEAM_RUN))]
    assert listed == newest[:limit]


@pytest.mark.parametrize(("states", "rule"), [((), "NoSuchRule"), ((2,), ""),
                                             ((1, 2), "NoSuchRule")])
def test_filters_are_checked_on_the_index_not_the_table(
        storm_db: tuple[Path, str], states: tuple[int, ...], rule: str) -> None:
    path, own = storm_db
    for run_ids in (None, [own]):
        query, params = alerts_query("", states, rule, 11, run_ids, None)
        with sqlite3.connect(path) as conn:
            steps = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query, params)]
            assert conn.execute(query, params).fetchall() == []
        # Alerts that fail the filter are passed over on the index; the table is read
        # only by alert_id, for the page's own rows.
        reads = [step for step in steps if step.startswith(("SCAN alerts", "SEARCH alerts"))]
        assert any("COVERING INDEX alerts_page_by_" in step for step in reads), steps
        assert all("COVERING INDEX" in step or "(alert_id=?)" in step for step in reads), steps


class RecordingStorage(SQLiteStorage):
    """SQLite storage that keeps the scope of every alert read it answers."""

    scopes: list[Sequence[str] | None]

    def alerts(self, *args: object, **kwargs: object) -> list[AlertRecord]:
        self.scopes.append(kwargs.get("run_ids"))  # type: ignore[arg-type]
        return super().alerts(*args, **kwargs)  # type: ignore[arg-type]


def test_the_ledger_hands_the_callers_runs_to_storage(storm_db: tuple[Path, str]) -> None:
    path, own = storm_db
    store = RecordingStorage(str(path))
    store.scopes = []
    ledger = Ledger(store, AlertEngine([]), LiveState())
    try:
        store.scopes.clear()
        alerts = ledger.list_alerts("", (), "", 10, Principal(("teamA-*",)))
        assert [a.run_id for a in alerts] == [own] * 10
        assert ledger.list_alerts("", (), "", 10, Principal(("teamC-*",))) == []
        assert store.scopes == [[own]]  # the empty scope needed no read at all
        assert len(ledger.list_alerts("", (), "", 10, Principal(("*",)))) == 10
        assert store.scopes[-1] is None
    finally:
        ledger.close()


def test_a_scoped_token_pages_through_its_own_alerts(storm_db: tuple[Path, str],
                                                     tmp_path: Path) -> None:
    path, own = storm_db
    copy = tmp_path / "raresignal.db"
    with sqlite3.connect(path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    with start_in_thread(config(tmp_path, tokens=TOKENS)) as server:
        team_a = Client(server.grpc_target, token="team-a-token")
        admin = Client(server.grpc_target, token="admin-token")
        try:
            request = alerts_pb2.ListAlertsRequest(page_size=OWN_ALERTS // 3 + 1)
            listed: list[str] = []
            while True:
                response = team_a.alerts.ListAlerts(request, metadata=team_a.metadata,
                                                    timeout=30)
                listed += [a.run_id for a in response.alerts]
                if not response.next_page_token:
                    break
                request.page_token = response.next_page_token
            assert listed == [own] * OWN_ALERTS
            everyone = admin.alerts.ListAlerts(alerts_pb2.ListAlertsRequest(page_size=50),
                                               metadata=admin.metadata, timeout=30)
            assert len(everyone.alerts) == 50 and everyone.next_page_token
            # A token of the admin's list does not resume team A's.
            with pytest.raises(grpc.RpcError) as raised:
                team_a.alerts.ListAlerts(
                    alerts_pb2.ListAlertsRequest(page_token=everyone.next_page_token),
                    metadata=team_a.metadata, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            team_a.close()
            admin.close()


def _alert_rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's nodes on the alerts table produced or filtered out, all loops."""
    read = 0
    if plan.get("Relation Name") == "alerts":
        loops = plan.get("Actual Loops", 1)
        read += (plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
                 + plan.get("Rows Removed by Index Recheck", 0)) * loops
    return read + sum(_alert_rows_read(child) for child in plan.get("Plans", ()))


def test_postgres_reads_only_the_callers_alerts(postgres_cluster: Cluster,
                                                postgres_db: str) -> None:
    import psycopg

    from raresignal.server.storage.postgres import PostgresStorage, alerts_query

    conninfo = postgres_cluster.admin_conninfo(postgres_db)
    store = PostgresStorage(conninfo)
    try:
        own = store_alerts(store, "teamA-run", OWN_ALERTS, run_index=0)
        for index in range(1, OTHER_RUNS + 1):
            store_alerts(store, f"teamB-{index}", ALERTS_PER_OTHER_RUN, run_index=index)
    finally:
        store.close()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("ANALYZE alerts")
        for run_ids, after, wanted, bound in (
                ([own], None, 11, OWN_ALERTS),
                (None, (1_700_000_010.123456, ""), 20, 20 + ALERTS_PER_OTHER_RUN)):
            query, params = alerts_query("", (), "", wanted, run_ids, after)
            row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params).fetchone()
            assert row is not None
            plan = row[0][0]["Plan"]
            assert 0 < _alert_rows_read(plan) <= bound, plan


def test_a_file_with_the_earlier_alert_indexes_gets_the_page_indexes(tmp_path: Path) -> None:
    path = tmp_path / "earlier.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE alerts (alert_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, "
                     "run_name TEXT NOT NULL, rule TEXT NOT NULL, labels TEXT NOT NULL, "
                     "state INTEGER NOT NULL, severity TEXT NOT NULL, summary TEXT NOT NULL, "
                     "value REAL NOT NULL, threshold REAL NOT NULL, step INTEGER NOT NULL, "
                     "started_at REAL NOT NULL, fired_at REAL NOT NULL, "
                     "resolved_at REAL NOT NULL)")
        conn.execute("CREATE INDEX alerts_by_run ON alerts (run_id, started_at)")
        conn.execute("CREATE INDEX alerts_by_start ON alerts (started_at DESC, alert_id)")
    SQLiteStorage(str(path)).close()
    with sqlite3.connect(path) as conn:
        indexes = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'alerts' "
            "AND name NOT LIKE 'sqlite_autoindex%'")}
    assert indexes == {"alerts_page_by_run", "alerts_page_by_start"}
