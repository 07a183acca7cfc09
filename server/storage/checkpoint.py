"""Copies SQLite's write-ahead log into the database file on a thread of its own.

Left to itself, SQLite checkpoints inside the COMMIT that takes the WAL past 1000 pages:
the ingest thread then copies pages and waits for two fsyncs, a stall of many
milliseconds every few group commits. The storage switches that off and this thread
checkpoints instead, from its own connection, while ingest goes on: a PASSIVE checkpoint
never blocks the writer, sqlite3 releases the GIL while it works, and a checkpoint that
covers more commits copies each hot page once rather than once per commit.

SQLite rewinds the WAL only when a write transaction begins after a checkpoint copied
all of it, which unbroken load seldom allows. So once the WAL holds ``rewind_pages``
pages, the checkpointer copies the last few pages while holding the storage's write
lock: the writer waits for that short copy, and its next transaction starts the WAL
afresh, which keeps the file bounded.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import AbstractContextManager

log = logging.getLogger("raresignal.server")

CHECKPOINT_INTERVAL_SECONDS = 0.25
REWIND_PAGES = 4096  # 16 MiB of 4 KiB pages


class WalCheckpointer:
    """Checkpoints one SQLite database in WAL mode until :meth:`close`.

    ``write_lock`` is held by the storage around each of its write transactions.
    """

    def __init__(self, path: str, write_lock: AbstractContextManager[object],
                 interval_seconds: float = CHECKPOINT_INTERVAL_SECONDS,
                 rewind_pages: int = REWIND_PAGES) -> None:
        self._write_lock = write_lock
        self._interval = interval_seconds
        self._rewind_pages = rewind_pages
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._stop = threading.Event()
        self.rounds = 0
        self.rewinds = 0
        self._thread = threading.Thread(target=self._run, name="raresignal-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.checkpoint()
            except sqlite3.Error as exc:  # the WAL keeps everything; the next round retries
                log.warning("SQLite checkpoint failed (%s); trying again", exc)

    def checkpoint(self) -> None:
        """One round: copy the WAL without blocking; if it grew long, let it rewind."""
        _, wal_pages, _ = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.rounds += 1
        if wal_pages >= self._rewind_pages:
            # Copy what was written during the first pass, still without blocking, so
            # that the writer waits only for the little written during this one.
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            with self._write_lock:  # no write transaction open: this copy completes
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.rewinds += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._db.close()
