"""Versioned schema migrations for the PostgreSQL backend.

Migrations are numbered SQL files (``migrations/postgres/0001_initial.sql``, ...) applied
in order, each in its own transaction together with its row in ``schema_version``. The
whole run holds an advisory lock, so servers starting together on one database apply each
migration once: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

# An arbitrary constant that names "raresignal's schema" among the database's advisory locks.
MIGRATION_LOCK_KEY = 0x72617265_7369676E  # "raresign"
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def shipped_migrations() -> list[Migration]:
    """The PostgreSQL migrations shipped with the package, oldest first."""
    folder = resources.files("raresignal.server.storage").joinpath("migrations/postgres")
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1, 2, ... without gaps: {versions}")
    return found


def migrate(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Brings the database's schema up to date; returns the versions this call applied.

    ``conn`` must be in autocommit mode: each migration opens its own transaction.
    """
    if not conn.autocommit:
        raise ValueError("migrate() needs a connection in autocommit mode")
    pending = shipped_migrations() if migrations is None else migrations
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                     "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = row[0] if row else 0
        known = max((m.version for m in pending), default=0)
        if current > known:
            raise RuntimeError(f"the database's schema is version {current}, newer than this "
                               f"server knows ({known}); upgrade the server")
        applied = []
        for migration in pending:
            if migration.version <= current:
                continue
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                             (migration.version, migration.name))
            applied.append(migration.version)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def schema_version(conn: psycopg.Connection) -> int:
    """The newest migration applied to the database (0: none)."""
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return row[0] if row else 0
