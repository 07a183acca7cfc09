"""Picks the storage backend from the one setting that names it (``--db``).

``postgresql://user@host:port/db`` (or ``postgres://``) opens PostgreSQL; anything else
is SQLite: ``sqlite:///path/raresignal.db``, a plain path, or ``:memory:``. A database
password never travels in the URL, where it would show in the process list and the
logs: it comes from the file that ``RARESIGNAL_DB_PASSWORD_FILE`` names, or from libpq's
own ``PGPASSWORD`` or ``PGPASSFILE`` (``~/.pgpass``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping

from raresignal.server.storage.base import RetentionPolicy, Storage

PASSWORD_FILE_ENV = "RARESIGNAL_DB_PASSWORD_FILE"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite://"


def is_postgres_url(url: str) -> bool:
    return url.startswith(_POSTGRES_SCHEMES)


def sqlite_path(url: str) -> str:
    """The SQLite file a ``sqlite://`` URL or a plain path names (``:memory:`` as is)."""
    if not url.startswith(_SQLITE_SCHEME):
        return url
    path = url[len(_SQLITE_SCHEME):]
    if not path:
        return ":memory:"
    # sqlite:///relative/or/absolute: the third slash starts the path (sqlite:////abs).
    if not path.startswith("/"):
        raise ValueError(f"a SQLite URL is sqlite:///path, not {url!r}")
    return path[1:] or ":memory:"


def postgres_password(conninfo: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The password to pass beside ``conninfo``: the password file's content, or None to
    leave libpq to its own PGPASSWORD/PGPASSFILE. A password in ``conninfo`` is refused."""
    from psycopg.conninfo import conninfo_to_dict

    if "password" in conninfo_to_dict(conninfo):
        raise ValueError(
            "the database URL contains a password, which would show in the process list "
            f"and the logs; put it in a file named by {PASSWORD_FILE_ENV}, or use libpq's "
            "PGPASSWORD or PGPASSFILE (~/.pgpass) instead")
    path = environ.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    with open(path, encoding="utf-8") as file:
        # A trailing newline is the editor's, not the password's.
        return file.read().rstrip("\r\n")


class StorageOpenError(Exception):
    """The database named by ``--db`` cannot be opened; the message says why."""


def open_storage(url: str, retention: RetentionPolicy | None = None) -> Storage:
    """The backend ``url`` names, opened (and, for PostgreSQL, migrated)."""
    if is_postgres_url(url):
        try:
            import psycopg

            from raresignal.server.storage.postgres import PostgresStorage
        except ImportError as error:
            raise StorageOpenError("a postgresql:// database needs the postgres extra: "
                                   "pip install 'raresignal[server,postgres]'") from error
        try:
            return PostgresStorage(url, retention, password=postgres_password(url))
        except (ValueError, OSError, psycopg.Error) as error:
            raise StorageOpenError(f"cannot open the PostgreSQL database: {error}") from error
    from raresignal.server.storage.sqlite import SQLiteStorage

    try:
        return SQLiteStorage(sqlite_path(url), retention)
    except (ValueError, sqlite3.Error) as error:
        raise StorageOpenError(f"cannot open the SQLite database {url!r}: {error}") from error
