"""Which spools in a folder belong to a live sender, and which were left behind.

A sender holds an exclusive lock on ``<sender_id>.lock`` for as long as it runs and keeps
``<sender_id>.run.json`` (its run name and, once the server assigned it, the run id) next
to its spool. A spool whose lock nobody holds was left by a process that ended before
delivering it; a later sender of the same run name and rank finds it here and delivers it
to the run it belongs to. The lock, not a process id, decides: it is released by the
kernel whatever way the process ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so left-behind spools are not adopted
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".spool"
_LOCK_SUFFIX = ".lock"
_RUN_SUFFIX = ".run.json"


@dataclass(frozen=True)
class LeftBehind:
    """A spool no live sender holds: whose it was and which run it reports to."""

    sender_id: str
    run_name: str
    run_id: str | None


class SpoolClaim:
    """This sender's hold on its spool: the lock and the run it reports to."""

    def __init__(self, spool_dir: Path, sender_id: str, handle: BinaryIO | None) -> None:
        self._dir = spool_dir
        self.sender_id = sender_id
        self._handle = handle

    @classmethod
    def take(cls, spool_dir: Path, sender_id: str) -> SpoolClaim | None:
        """The claim, or None when another live process holds it."""
        if fcntl is None:
            return cls(spool_dir, sender_id, None)
        try:
            spool_dir.mkdir(parents=True, exist_ok=True)
            handle = open(spool_dir / f"{sender_id}{_LOCK_SUFFIX}", "ab")  # noqa: SIM115
        except OSError as error:
            log.warning("raresignal: cannot lock the spool of %s in %s (%s); it will not be "
                        "found by a later process if this one dies", sender_id, spool_dir,
                        error)
            return cls(spool_dir, sender_id, None)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
        return cls(spool_dir, sender_id, handle)

    def record_run(self, run_name: str, run_id: str | None) -> None:
        """Notes the run this spool reports to (atomically), for whoever finds it later."""
        path = self._dir / f"{self.sender_id}{_RUN_SUFFIX}"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"run_name": run_name, "run_id": run_id}))
            os.replace(tmp, path)
        except OSError as error:
            log.warning("raresignal: cannot record the run of spool %s (%s)", path, error)

    def release(self, delivered: bool) -> None:
        """Lets go of the spool; with nothing left to deliver, its files go too."""
        if delivered:
            for suffix in (_RUN_SUFFIX, _LOCK_SUFFIX):
                with contextlib.suppress(OSError):
                    (self._dir / f"{self.sender_id}{suffix}").unlink(missing_ok=True)
        if self._handle is not None:
            self._handle.close()  # closing the file releases the lock
            self._handle = None


def _is_held(spool_dir: Path, sender_id: str) -> bool:
    claim = SpoolClaim.take(spool_dir, sender_id)
    if claim is None:
        return True
    claim.release(delivered=False)
    return False


def find_left_behind(spool_dir: Path, run_name: str | None = None, sender_prefix: str = "",
                     own_sender_id: str = "") -> list[LeftBehind]:
    """Spools in ``spool_dir`` of senders named ``sender_prefix…`` (e.g. this rank's) that
    reported to a run named ``run_name`` (None: any) and that no live process holds."""
    if fcntl is None or not spool_dir.is_dir():
        return []
    found = []
    for spool in sorted(spool_dir.glob(f"{sender_prefix}*{SPOOL_SUFFIX}")):
        sender_id = spool.name[: -len(SPOOL_SUFFIX)]
        if sender_id == own_sender_id:
            continue
        try:
            run = json.loads((spool_dir / f"{sender_id}{_RUN_SUFFIX}").read_text())
        except (OSError, ValueError):
            continue  # no record of its run: it cannot be delivered to the right place
        if not isinstance(run, dict) or not isinstance(run.get("run_name"), str):
            continue
        if run_name is not None and run["run_name"] != run_name:
            continue
        if _is_held(spool_dir, sender_id):
            continue
        run_id = run.get("run_id")
        found.append(LeftBehind(sender_id, run["run_name"],
                                run_id if isinstance(run_id, str) else None))
    return found
