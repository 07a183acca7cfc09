"""``raresignal spool push``: delivers the spools that training processes left behind.

A process that ended before the server had everything leaves its spool; the next process
of the same run name delivers it by itself. This is for when no such process comes: each
left-behind spool goes to its own run, which is then closed as failed (its process ended
without closing it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from raresignal.agent.config import MonitorConfig, default_spool_dir, default_spool_root
from raresignal.agent.sender import LEFT_BEHIND_RUN_STATE, left_behind_sender
from raresignal.agent.spool_claims import find_left_behind
from raresignal.protos.transport import TlsConfig


def spool_folders(spool_dir: str | None, run_name: str | None) -> list[Path]:
    """The folders to look in: the one given, the run's default one, or every run's."""
    if spool_dir:
        return [Path(spool_dir)]
    if run_name:
        return [default_spool_dir(run_name)]
    root = default_spool_root()
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def push(folders: Sequence[Path], target: str, run_name: str | None, timeout: float,
         token: str | None = None, tls: TlsConfig | None = None,
         say: Callable[[str], None] = print) -> int:
    """Delivers every left-behind spool in ``folders`` (of ``run_name``, or any run);
    returns 0 when all were delivered, 1 otherwise."""
    config = MonitorConfig(token=token, tls=tls)
    found = [(folder, spool) for folder in folders
             for spool in find_left_behind(folder, run_name)]
    if not found:
        say(f"no left-behind spools in {', '.join(map(str, folders)) or 'the spool folders'}")
        return 0
    failures = 0
    for folder, spool in found:
        sender = left_behind_sender(spool, target, config, folder)
        delivered = sender.close(LEFT_BEHIND_RUN_STATE, timeout)
        where = f"{sender.spool_path} (run {spool.run_name!r}, {sender.run_id or 'no run'})"
        if delivered:
            say(f"delivered {sender.applied_batches} batches from {where}; the run is "
                f"closed as {LEFT_BEHIND_RUN_STATE}")
        else:
            failures += 1
            say(f"not delivered within {timeout:g} s: {where}; it stays for the next try")
    return 1 if failures else 0
