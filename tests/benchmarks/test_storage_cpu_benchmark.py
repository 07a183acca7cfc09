"""The storage-CPU benchmark at tiny size, on a real throwaway cluster: both backends store
every sample it sends, and it prints a figure per backend (and a profile when asked)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytest.importorskip("psycopg_pool")

import storage_cpu
from postgres_cluster import find_bindir


@pytest.mark.skipif(find_bindir() is None, reason="PostgreSQL's initdb is not installed")
def test_both_backends_are_measured_and_profiled(capsys: pytest.CaptureFixture[str]) -> None:
    assert storage_cpu.main(["--senders", "2", "--batch-size", "20", "--groups", "3",
                             "--repeats", "1", "--profile", "5"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(sqlite|postgres) +process +([\d.]+)", out, re.MULTILINE))
    assert set(rows) == {"sqlite", "postgres"} and all(float(v) > 0 for v in rows.values())
    assert re.search(r"^postgres .*database +[\d.]+ .*x sqlite\)$", out, re.MULTILINE)
    assert "postgres: the functions with the most CPU time" in out
