"""Paged lists over a real server: every item once and in order, pages under the message
cap even when filled with the largest fields allowed, and tokens that only resume the
request they came from."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_support import Client, batch, config, sample
from stored_alerts import stored_alerts

from raresignal.protos.transport import MAX_MESSAGE_BYTES
from raresignal.protos.v1 import alerts_pb2, common_pb2, ingest_pb2
from raresignal.server.serving.app import ServerHandle, start_in_thread
from raresignal.server.serving.quotas import Quotas
from raresignal.server.serving.validation import (
    MAX_ALERTS_PAGE_SIZE,
    MAX_MAP_ENTRIES,
    MAX_MAP_VALUE_CHARS,
    MAX_NAME_CHARS,
    PAGE_BYTES,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Summaries come from the rules file; the page maximum counts on this much per alert.
SUMMARY_CHARS = 1024


def pages(call: Callable[..., Any], request: Any,
          metadata: Sequence[tuple[str, str]] = ()) -> Iterator[Any]:
    """Every response of a paged call, following next_page_token to the end."""
    while True:
        response = call(request, metadata=metadata, timeout=30)
        yield response
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def _in_run_order(listed: Sequence[common_pb2.RunInfo], opened: Sequence[str]) -> bool:
    """Whether ``listed`` holds each opened run once, oldest first (runs opened within one
    clock tick share created_at, and their run ids order them)."""
    keys = [(run.created_at, run.run_id) for run in listed]
    return keys == sorted(keys) and sorted(k[1] for k in keys) == sorted(opened)


@pytest.fixture
def big_alerts(tmp_path: Path) -> Iterator[tuple[ServerHandle, str]]:
    db = tmp_path / "raresignal.db"
    run_id = stored_alerts(db, "n" * MAX_NAME_CHARS, 2 * MAX_ALERTS_PAGE_SIZE + 17,
                           summary="S" * SUMMARY_CHARS)
    with start_in_thread(config(tmp_path)) as handle:
        yield handle, run_id


def test_the_advertised_limit_answers_pages_of_maximal_alerts_under_the_cap(
        big_alerts: tuple[ServerHandle, str]) -> None:
    server, _ = big_alerts
    client = Client(server.grpc_target)
    try:
        request = alerts_pb2.ListAlertsRequest(limit=10_000)
        responses = list(pages(client.alerts.ListAlerts, request))
    finally:
        client.close()
    # Maximal alerts fill a page by count: the byte bound did not have to cut it short.
    assert [len(r.alerts) for r in responses] == [MAX_ALERTS_PAGE_SIZE] * 2 + [17]
    assert max(r.ByteSize() for r in responses) < PAGE_BYTES < MAX_MESSAGE_BYTES
    listed = [(a.started_at, a.alert_id) for r in responses for a in r.alerts]
    assert listed == sorted(listed, key=lambda k: (-k[0], k[1]))
    assert len(set(listed)) == 2 * MAX_ALERTS_PAGE_SIZE + 17


def test_pages_shrink_to_the_byte_bound_when_items_are_larger(tmp_path: Path) -> None:
    # A summary the count maximum did not plan for (a long rule template): the page ends
    # at the byte bound instead of failing at the transport's cap.
    stored_alerts(tmp_path / "raresignal.db", "big", 300, summary="S" * 20_000)
    with start_in_thread(config(tmp_path)) as server:
        client = Client(server.grpc_target)
        try:
            request = alerts_pb2.ListAlertsRequest(page_size=MAX_ALERTS_PAGE_SIZE)
            responses = list(pages(client.alerts.ListAlerts, request))
        finally:
            client.close()
    assert len(responses) == 3
    assert sum(len(r.alerts) for r in responses) == 300
    assert all(r.ByteSize() <= PAGE_BYTES for r in responses)


def test_runs_with_maximal_config_and_tags_come_in_pages_under_the_cap(
        tmp_path: Path) -> None:
    maximal = {f"k{i:03d}" + "k" * (MAX_NAME_CHARS - 4): "v" * MAX_MAP_VALUE_CHARS
               for i in range(MAX_MAP_ENTRIES)}
    # The largest metadata the field limits allow, past the default quota.
    quotas = Quotas(max_run_metadata_bytes=2 * MAX_MAP_ENTRIES
                    * (MAX_NAME_CHARS + MAX_MAP_VALUE_CHARS))
    with start_in_thread(config(tmp_path, quotas=quotas)) as server:
        client = Client(server.grpc_target)
        opened = []
        for i in range(3):
            request = ingest_pb2.OpenRunRequest(run_name=f"{i}" + "n" * (MAX_NAME_CHARS - 1),
                                                world_size=1, config=maximal, tags=maximal)
            opened.append(client.ingest.OpenRun(request, timeout=30).run_id)
        responses = list(pages(client.runs.ListRuns, alerts_pb2.ListRunsRequest()))
        client.close()
    assert _in_run_order([r for response in responses for r in response.runs], opened)
    assert all(response.ByteSize() < MAX_MESSAGE_BYTES for response in responses)
    assert len(responses) == 3  # one maximal run alone is over half the cap


def test_runs_and_series_page_in_order(server: ServerHandle, client: Client) -> None:
    opened = [client.open_run(f"run-{i}").run_id for i in range(7)]
    request = alerts_pb2.ListRunsRequest(page_size=3)
    responses = list(pages(client.runs.ListRuns, request))
    assert [len(r.runs) for r in responses] == [3, 3, 1]
    assert _in_run_order([run for r in responses for run in r.runs], opened)

    client.report([batch(opened[0], 1, [sample("loss", step, 1.0) for step in range(250)])])
    series = alerts_pb2.GetSeriesRequest(run_id=opened[0], metric="loss", since_step=20,
                                         page_size=100)
    responses = list(pages(client.runs.GetSeries, series))
    assert [len(r.samples) for r in responses] == [100, 100, 30]
    assert [s.step for r in responses for s in r.samples] == list(range(20, 250))


def test_tokens_resume_only_the_request_they_came_from(server: ServerHandle,
                                                       client: Client) -> None:
    run_id = client.open_run("tokens").run_id
    client.open_run("tokens-2")
    client.report([batch(run_id, 1, [sample("loss", step, 1.0) for step in range(5)])])
    first = client.runs.ListRuns(alerts_pb2.ListRunsRequest(page_size=1), timeout=10)
    runs_token = first.next_page_token
    series = alerts_pb2.GetSeriesRequest(run_id=run_id, metric="loss", page_size=2)
    series_token = client.runs.GetSeries(series, timeout=10).next_page_token
    assert runs_token and series_token
    refused = [
        (client.alerts.ListAlerts, alerts_pb2.ListAlertsRequest(page_token=runs_token)),
        (client.runs.ListRuns, alerts_pb2.ListRunsRequest(page_token=series_token)),
        (client.runs.ListRuns, alerts_pb2.ListRunsRequest(page_token=runs_token,
                                                          include_finished=True)),
        (client.runs.GetSeries, alerts_pb2.GetSeriesRequest(
            run_id=run_id, metric="loss", since_step=1, page_token=series_token)),
        (client.runs.ListRuns, alerts_pb2.ListRunsRequest(page_token="not a token")),
        (client.runs.ListRuns, alerts_pb2.ListRunsRequest(page_token=runs_token[:-2])),
        (client.runs.ListRuns, alerts_pb2.ListRunsRequest(page_token="x" * 5000)),
        (client.runs.ListRuns, alerts_pb2.ListRunsRequest(page_size=-1)),
        (client.alerts.ListAlerts, alerts_pb2.ListAlertsRequest(page_size=-1)),
    ]
    for call, request in refused:
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=10)
        assert raised.value.code() == INVALID, request
    resumed = client.runs.ListRuns(alerts_pb2.ListRunsRequest(page_token=runs_token),
                                   timeout=10)
    assert sorted(r.run_name for r in [*first.runs, *resumed.runs]) == ["tokens", "tokens-2"]
    assert not resumed.next_page_token
