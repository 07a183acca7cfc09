"""`raresignal runs` and `raresignal alerts` read every page a real server answers, up to
--limit in all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from raresignal.client.cli import main
from raresignal.client.paging import follow_pages
from raresignal.protos.v1 import common_pb2
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread
from raresignal.server.serving.validation import DEFAULT_PAGE_SIZE, MAX_ALERTS_PAGE_SIZE
from raresignal.server.storage.records import AlertRecord, EngineWrites, RunRecord
from raresignal.server.storage.sqlite import SQLiteStorage

ALERTS = MAX_ALERTS_PAGE_SIZE + 150
RUNS = DEFAULT_PAGE_SIZE + 20


def _store_runs_and_alerts(db: Path) -> None:
    store = SQLiteStorage(str(db))
    for index in range(RUNS):
        run = RunRecord(run_id=f"{index:016x}", run_name=f"run-{index}",
                        state=common_pb2.RUN_STATE_ACTIVE, world_size=1,
                        created_at=1.0 + index, updated_at=1.0, last_step=0,
                        report_interval_seconds=0.0)
        store.create_run(run)
    alerts = [AlertRecord(alert_id=f"alert-{i:05d}", run_id=f"{0:016x}", run_name="run-0",
                          rule="RunStalled", labels={}, state=common_pb2.ALERT_STATE_RESOLVED,
                          severity="warning", summary="stalled", value=1.0, threshold=1.0,
                          step=i, started_at=1_700_000_000.0 + i, fired_at=1_700_000_000.5)
              for i in range(ALERTS)]
    store.update_run(run, EngineWrites(alerts=alerts))
    store.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    folder = tmp_path_factory.mktemp("paged-cli")
    _store_runs_and_alerts(folder / "raresignal.db")
    config = ServerConfig(db_path=str(folder / "raresignal.db"), host="127.0.0.1",
                          grpc_port=0, metrics_port=0, health_port=0)
    with start_in_thread(config) as handle:
        yield handle


def _rows(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(list(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines[1:]  # below the header


def test_alerts_follow_pages_up_to_the_limit(server: ServerHandle,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    target = server.grpc_target
    every = _rows(capsys, "alerts", "--limit", "0", "--server", target)
    assert len(every) == ALERTS
    assert every[0].split()[-2] == str(ALERTS - 1)  # newest first: the STEP column
    assert len(_rows(capsys, "alerts", "--limit", str(ALERTS - 7), "--server", target)) \
        == ALERTS - 7
    assert len(_rows(capsys, "alerts", "--server", target)) == 100  # the default total


def test_runs_follow_pages(server: ServerHandle, capsys: pytest.CaptureFixture[str]) -> None:
    target = server.grpc_target
    names = [row.split()[1] for row in _rows(capsys, "runs", "--server", target)]
    assert names == [f"run-{i}" for i in range(RUNS)]
    assert len(_rows(capsys, "runs", "--limit", "5", "--server", target)) == 5
    assert main(["runs", "--limit", "-1", "--server", target]) == 2


def test_follow_pages_asks_for_what_is_still_wanted() -> None:
    asked: list[tuple[str, int]] = []

    def fetch(token: str, page_size: int) -> tuple[list[int], str]:
        asked.append((token, page_size))
        start = int(token or 0)
        page = list(range(start, min(start + min(page_size or 4, 4), 10)))
        return page, str(page[-1] + 1) if page[-1] < 9 else ""

    assert list(follow_pages(fetch)) == list(range(10))
    assert asked == [("", 0), ("4", 0), ("8", 0)]
    asked.clear()
    assert list(follow_pages(fetch, limit=6)) == list(range(6))
    assert asked == [("", 6), ("4", 2)]
