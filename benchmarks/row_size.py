"""Bytes per stored sample row on PostgreSQL: heap and primary-key index of one daily
partition of ``samples`` holding 1,000 series × 1,000 steps, written step by step across
the series as ingest writes them, then vacuumed.

    python benchmarks/row_size.py
"""

from __future__ import annotations

import time

import psycopg
from server_processes import start_cluster

from raresignal.server.storage.migrate import migrate
from raresignal.server.storage.partitions import DAY_SECONDS, partition_name

SERIES = 1_000
STEPS = 1_000


def main() -> int:
    cluster = start_cluster()
    try:
        db = cluster.create_database()
        with psycopg.connect(cluster.admin_conninfo(db), autocommit=True) as conn:
            migrate(conn)
            day = int(time.time() // DAY_SECONDS)
            name = partition_name(day)
            start = day * DAY_SECONDS
            conn.execute(f"CREATE TABLE {name} PARTITION OF samples FOR VALUES FROM "
                         f"({start}) TO ({start + DAY_SECONDS})")
            conn.execute(f"INSERT INTO samples SELECT s, st, random(), {start} + st * 0.01 "
                         f"FROM generate_series(1, {SERIES}) s, generate_series(1, {STEPS}) st "
                         "ORDER BY st, s")
            conn.execute(f"VACUUM ANALYZE {name}")
            row = conn.execute(f"SELECT pg_relation_size('{name}'), pg_indexes_size('{name}')"
                               ).fetchone()
            assert row is not None
            rows = SERIES * STEPS
            print(f"{rows:,} rows: heap {row[0] / rows:.1f} B/row, index {row[1] / rows:.1f} "
                  f"B/row, total {(row[0] + row[1]) / rows:.1f} B/row")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
