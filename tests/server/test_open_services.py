"""What a caller without a token reaches: health (Check always, Watch up to a bound), and
reflection only on a server that has no tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_support import config, wait_for

from raresignal.client.channels import auth_metadata
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread

TOKEN = "reflection-test-token"
WATCHES = ServerConfig().max_health_watches  # the shipped bound


def list_services(target: str, token: str | None) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = stub.ServerReflectionInfo(iter([request]),
                                                metadata=auth_metadata(token), timeout=10)
        return [service.name for service in response.list_services_response.service]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ServerHandle]:
    with start_in_thread(config(tmp_path, tokens={TOKEN: ["*"]})) as handle:
        yield handle


def test_reflection_needs_a_token_where_tokens_are_configured(secured: ServerHandle) -> None:
    for token in (None, "wrong-token"):
        with pytest.raises(grpc.RpcError) as raised:
            list_services(secured.grpc_target, token)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "raresignal.v1.Ingest" in list_services(secured.grpc_target, TOKEN)


def test_reflection_is_open_on_an_open_server(tmp_path: Path) -> None:
    with start_in_thread(config(tmp_path)) as handle:
        assert "raresignal.v1.Ingest" in list_services(handle.grpc_target, None)


def watch(stub: health_pb2_grpc.HealthStub) -> grpc.Future:
    # A deadline far past the test: only cancel() ends a stream that holds a place.
    return stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=600)


def test_health_watches_are_bounded_and_check_stays_open(secured: ServerHandle) -> None:
    with grpc.insecure_channel(secured.health_target) as health_channel, \
            grpc.insecure_channel(secured.grpc_target) as grpc_channel:
        on_health_port = health_pb2_grpc.HealthStub(health_channel)
        on_grpc_port = health_pb2_grpc.HealthStub(grpc_channel)
        streams = []
        try:
            # The bound is shared by both ports: half the watches on each.
            for index in range(WATCHES):
                stream = watch(on_health_port if index % 2 else on_grpc_port)
                # The first answer means the server counts this stream.
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
                streams.append(stream)
            for stub in (on_health_port, on_grpc_port):
                with pytest.raises(grpc.RpcError) as raised:
                    next(watch(stub))
                assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # Probes use Check, which no number of watches refuses.
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            # A watch that ends frees its place.
            streams.pop().cancel()

            def watch_accepted() -> bool:
                try:
                    streams.append(stream := watch(on_health_port))
                    return next(stream).status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False

            wait_for(watch_accepted)
        finally:
            for stream in streams:
                stream.cancel()
