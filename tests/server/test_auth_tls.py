"""Bearer tokens scoped to run names, TLS with a certificate made in the test, and the
plaintext health port."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_support import Client, batch, config, sample

from raresignal.protos.transport import TlsConfig
from raresignal.protos.v1 import alerts_pb2
from raresignal.server.serving.app import ServerHandle, start_in_thread
from raresignal.server.serving.auth import parse_tokens, parse_tokens_env

TOKENS = {"team-a-token": ["teamA-*"], "admin-token": ["*"]}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ServerHandle]:
    with start_in_thread(config(tmp_path, tokens=TOKENS)) as handle:
        yield handle


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value.code()


def test_missing_or_unknown_tokens_are_unauthenticated(secured: ServerHandle) -> None:
    for token in (None, "wrong-token"):
        client = Client(secured.grpc_target, token=token)
        assert code_of(lambda c=client: c.open_run("teamA-x")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda c=client: c.report([batch("r", 1, [])])) == (
            grpc.StatusCode.UNAUTHENTICATED)
        assert code_of(lambda c=client: c.list_alerts()) == grpc.StatusCode.UNAUTHENTICATED
        client.close()
    malformed = Client(secured.grpc_target)
    malformed.metadata = (("authorization", "Basic dXNlcjpwYXNz"),)
    assert code_of(lambda: malformed.open_run("teamA-x")) == grpc.StatusCode.UNAUTHENTICATED
    malformed.close()


def test_tokens_are_scoped_to_run_names(secured: ServerHandle) -> None:
    team_a = Client(secured.grpc_target, token="team-a-token")
    admin = Client(secured.grpc_target, token="admin-token")
    mine = team_a.open_run("teamA-exp1").run_id
    theirs = admin.open_run("teamB-exp1").run_id
    assert team_a.report([batch(mine, 1, [sample("loss", 1, 1.0)])])[0].samples_applied == 1
    assert code_of(lambda: team_a.open_run("teamB-x")) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as raised:
        team_a.report([batch(theirs, 1, [sample("loss", 1, 1.0)])])
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "teamB-exp1" in raised.value.details()
    assert admin.series(theirs, "loss") == []  # nothing was written
    assert code_of(lambda: team_a.close_run(theirs)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: team_a.series(theirs, "loss")) == grpc.StatusCode.PERMISSION_DENIED
    # Reads are filtered to the runs a token may see.
    visible = team_a.runs.ListRuns(alerts_pb2.ListRunsRequest(), metadata=team_a.metadata,
                                   timeout=10).runs
    assert [r.run_name for r in visible] == ["teamA-exp1"]
    everything = admin.runs.ListRuns(alerts_pb2.ListRunsRequest(), metadata=admin.metadata,
                                     timeout=10).runs
    assert sorted(r.run_name for r in everything) == ["teamA-exp1", "teamB-exp1"]
    team_a.close()
    admin.close()


def test_health_needs_no_token_on_either_port(secured: ServerHandle) -> None:
    for target in (secured.health_target, secured.grpc_target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "raresignal.v1.Ingest"):
                response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=10)
                assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_token_formats() -> None:
    assert parse_tokens("a: [x-*, y]\nb: z\n") == {"a": ["x-*", "y"], "b": ["z"]}
    assert parse_tokens('{"a": ["x-*"]}') == {"a": ["x-*"]}
    assert parse_tokens("# comment\ntok1 teamA-* shared\ntok2\n") == {
        "tok1": ["teamA-*", "shared"], "tok2": ["*"]}
    assert parse_tokens_env("t1=teamA-*|shared-*,t2") == {"t1": ["teamA-*", "shared-*"],
                                                           "t2": ["*"]}


def _self_signed(directory: Path, name: str, ca: tuple[Path, Path] | None = None
                 ) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost made with the openssl CLI."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subject = ["-subj", f"/CN={name}", "-addext",
               "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-keyout", key, "-out", cert, *subject],
                       check=True, capture_output=True)
    else:
        csr = directory / f"{name}.csr"
        subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        key, "-out", csr, "-subj", f"/CN={name}"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0],
                        "-CAcreateserial", "-days", "2", "-out", cert], check=True,
                       capture_output=True)
    return key, cert


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    server = _self_signed(directory, "server")
    client_ca = _self_signed(directory, "client-ca")
    client = _self_signed(directory, "client", ca=client_ca)
    return {"server": server, "client_ca": client_ca, "client": client}


def test_tls_serves_clients_that_trust_the_certificate(
        tmp_path: Path, certificates: dict[str, tuple[Path, Path]]) -> None:
    key, cert = certificates["server"]
    tls = TlsConfig(certificate_chain=str(cert), private_key=str(key))
    with start_in_thread(config(tmp_path, tls=tls)) as handle:
        trusted = grpc.ssl_channel_credentials(cert.read_bytes())
        client = Client(handle.grpc_target, credentials=trusted)
        assert client.open_run("tls-run").run.run_name == "tls-run"
        client.close()
        plain = Client(handle.grpc_target)
        assert code_of(lambda: plain.open_run("x")) == grpc.StatusCode.UNAVAILABLE
        plain.close()


def test_mutual_tls_needs_a_client_certificate(
        tmp_path: Path, certificates: dict[str, tuple[Path, Path]]) -> None:
    key, cert = certificates["server"]
    _, ca_cert = certificates["client_ca"]
    client_key, client_cert = certificates["client"]
    tls = TlsConfig(certificate_chain=str(cert), private_key=str(key),
                    root_certificates=str(ca_cert))
    with start_in_thread(config(tmp_path, tls=tls)) as handle:
        with_cert = grpc.ssl_channel_credentials(cert.read_bytes(), client_key.read_bytes(),
                                                 client_cert.read_bytes())
        client = Client(handle.grpc_target, credentials=with_cert)
        assert client.open_run("mtls-run").run.run_name == "mtls-run"
        client.close()
        without = Client(handle.grpc_target,
                         credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
        assert code_of(lambda: without.open_run("x")) == grpc.StatusCode.UNAVAILABLE
        without.close()
