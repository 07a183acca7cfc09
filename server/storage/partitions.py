"""The daily partitions of PostgreSQL's ``samples`` table: prepared ahead, dropped when old.

Migration 0004 makes ``samples`` a table partitioned by ``wall_time``, one partition per UTC
day (``samples_YYYYMMDD``) plus ``samples_default`` for samples of a day that has none.
:func:`maintain_partitions` runs on a schedule: it creates today's partition and the next
ones, and drops the whole partitions older than the retention age, so old samples leave
without a row being deleted (no dead tuples, nothing for vacuum).

Replicas share one database: a transaction-scoped advisory lock lets one of them do the DDL
and the others skip that round rather than race on the same tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

DAY_SECONDS = 86_400
# Days prepared beyond today, so a sample after midnight finds its partition even when a
# maintenance round is late or was skipped.
DAYS_AHEAD = 2
# Names "raresignal's partition maintenance" among the database's advisory locks.
MAINTENANCE_LOCK_KEY = 0x72617265_70617274  # "rarepart"
# DDL on a partition waits for ingest transactions on ``samples``, and new ingest queues
# behind it: a round that cannot get its locks soon gives up and tries again next time.
LOCK_TIMEOUT = "2s"

_DAY_NAME = re.compile(r"^samples_(\d{8})$")


@dataclass(frozen=True)
class PartitionChanges:
    """What one maintenance round did: the days (since the epoch) created and dropped."""

    created: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)


def partition_name(day: int) -> str:
    """``samples_YYYYMMDD`` of the UTC day ``day`` days after the epoch."""
    date = datetime.fromtimestamp(day * DAY_SECONDS, tz=timezone.utc)
    return f"samples_{date:%Y%m%d}"


def day_of(name: str) -> int | None:
    """The day a partition's name stands for (None: not a daily partition)."""
    match = _DAY_NAME.match(name)
    if match is None:
        return None
    date = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=timezone.utc)
    return int(date.timestamp()) // DAY_SECONDS


def daily_partitions(cur: psycopg.Cursor[Any]) -> list[int]:
    """The days that have a partition, oldest first."""
    cur.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'samples'::regclass")
    days = (day_of(row[0]) for row in cur.fetchall())
    return sorted(day for day in days if day is not None)


def maintain_partitions(conn: psycopg.Connection, now: float,
                        max_age_days: int) -> PartitionChanges | None:
    """Creates the partitions of today and the next DAYS_AHEAD days, and drops those whose
    every sample is older than ``max_age_days`` (0: none dropped), in one transaction.
    None when another replica holds the maintenance lock (it does this round)."""
    today = int(now // DAY_SECONDS)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (MAINTENANCE_LOCK_KEY,))
        row = cur.fetchone()
        if row is None or not row[0]:
            return None
        cur.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        existing = set(daily_partitions(cur))
        created = [day for day in range(today, today + DAYS_AHEAD + 1) if day not in existing]
        for day in created:
            _create(cur, day)
        dropped = []
        if max_age_days > 0:
            # A day's partition ends at (day + 1) * DAY_SECONDS: dropped once that is older
            # than the retention age, so no sample younger than it is ever dropped.
            oldest_kept = now - max_age_days * DAY_SECONDS
            dropped = [day for day in sorted(existing)
                       if (day + 1) * DAY_SECONDS <= oldest_kept]
        for day in dropped:
            cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition_name(day))))
    return PartitionChanges(created, dropped)


def _create(cur: psycopg.Cursor[Any], day: int) -> None:
    """Creates a day's partition, moving into it the rows of that day the default partition
    caught; attaching (rather than CREATE ... PARTITION OF) so the move and the new bound
    are one step that the default partition's rows cannot contradict."""
    name = sql.Identifier(partition_name(day))
    start, end = day * DAY_SECONDS, (day + 1) * DAY_SECONDS
    cur.execute(sql.SQL("CREATE TABLE {} (LIKE samples)").format(name))
    cur.execute(sql.SQL(
        "WITH moved AS (DELETE FROM samples_default WHERE wall_time >= %s AND wall_time < %s "
        "RETURNING series_id, step, value, wall_time) INSERT INTO {} SELECT * FROM moved"
    ).format(name), (start, end))
    cur.execute(sql.SQL("ALTER TABLE samples ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})")
                .format(name, sql.Literal(start), sql.Literal(end)))
