"""Server processes for the benchmarks: a throwaway PostgreSQL cluster, replicas started on
it, and the CPU time a set of processes has used (from ``/proc/<pid>/stat``)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# The tests' own throwaway cluster and rule snippets, shared rather than copied.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))

from postgres_cluster import PASSWORD, Cluster, _free_port, find_bindir
from rule_snippets import LOSS_HIGH_RULES  # noqa: F401 (for the failover benchmark)

_TICKS = os.sysconf("SC_CLK_TCK")


def start_cluster() -> Cluster:
    """initdb and start a cluster on a free loopback port (as the tests do); stop() it."""
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL's initdb and pg_ctl are not installed")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    cluster = Cluster(bindir, Path(tempfile.mkdtemp(prefix="raresignal-bench-pg-")),
                      _free_port(), as_user)
    cluster.start()
    return cluster


def password_file(directory: Path) -> Path:
    """The cluster's password in a file, for RARESIGNAL_DB_PASSWORD_FILE."""
    path = directory / "db-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def postmaster_pid(cluster: Cluster) -> int:
    return int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])


def family(pid: int) -> list[int]:
    """``pid`` and its direct children (PostgreSQL's backends and background workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[1]) == pid:
                pids.append(int(entry))
    return pids


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process still alive (threads included)."""
    used: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    return used


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings (a process new since ``before`` counts from
    zero; one gone by ``after`` is lost, which undercounts short-lived workers)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
