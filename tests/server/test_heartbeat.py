"""The Heartbeat call on the real server: what it accepts, what it refuses and with
which status, and that it stores nothing of its own."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from server_support import Client, batch, config, sample

from raresignal.protos.v1 import alerts_pb2, ingest_pb2
from raresignal.server.serving.app import start_in_thread


def heartbeat(client: Client, run_id: str, step: int = 3, sender: str = "rank0-test"
              ) -> ingest_pb2.HeartbeatResponse:
    return client.ingest.Heartbeat(
        ingest_pb2.HeartbeatRequest(run_id=run_id, sender_id=sender, step=step,
                                    wall_time=1_700_000_000.0),
        metadata=client.metadata, timeout=10)


def refusal(client: Client, run_id: str, **fields: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        heartbeat(client, run_id, **fields)  # type: ignore[arg-type]
    return raised.value.code()


def test_a_heartbeat_is_answered_and_stores_nothing(client: Client) -> None:
    run_id = client.open_run("beating", interval=1.0).run_id
    client.report([batch(run_id, 1, [sample("loss", 2, 0.5)])])
    assert heartbeat(client, run_id, step=7) == ingest_pb2.HeartbeatResponse()
    assert client.series(run_id, "loss") == [(2, 0.5)]
    assert client.series(run_id, "step") == []
    (run,) = [r for r in client.runs.ListRuns(alerts_pb2.ListRunsRequest(), timeout=10).runs
              if r.run_id == run_id]
    assert run.last_step == 2  # a heartbeat moves the stall clock, not the stored run


def test_a_heartbeat_for_an_unknown_or_closed_run_is_refused(client: Client) -> None:
    assert refusal(client, "0" * 16) == grpc.StatusCode.NOT_FOUND
    run_id = client.open_run("closing", interval=1.0).run_id
    client.close_run(run_id)
    assert refusal(client, run_id) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("fields", [{"step": -1}, {"sender": ""}, {"sender": "a b"}])
def test_a_malformed_heartbeat_is_invalid(client: Client, fields: dict[str, object]) -> None:
    run_id = client.open_run("malformed", interval=1.0).run_id
    assert refusal(client, run_id, **fields) == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal(client, "not a run id") == grpc.StatusCode.INVALID_ARGUMENT


def test_a_heartbeat_needs_a_token_scoped_to_the_run(tmp_path: Path) -> None:
    tokens = {"team-a": ["team-a/*"], "team-b": ["team-b/*"]}
    with start_in_thread(config(tmp_path, tokens=tokens)) as handle:
        owner, other, anonymous = (Client(handle.grpc_target, token=token)
                                   for token in ("team-a", "team-b", None))
        try:
            run_id = owner.open_run("team-a/run", interval=1.0).run_id
            heartbeat(owner, run_id)
            assert refusal(other, run_id) == grpc.StatusCode.PERMISSION_DENIED
            assert refusal(anonymous, run_id) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            for client in (owner, other, anonymous):
                client.close()
