"""/metrics behind a scrape token and TLS, and without run names, on a real server scraped
over real HTTP(S)."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import Client, batch, config, sample
from tls_certificates import make_certificates, needs_openssl

from raresignal.protos.transport import TlsConfig
from raresignal.server.cli import _server_config, build_parser, server_settings
from raresignal.server.cli import main as server_main
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread
from raresignal.server.serving.metrics_endpoint import MetricsAccessError

SCRAPE_TOKEN = "scrape-token-0123456789"


def fetch(url: str, token: str | None = None, context: ssl.SSLContext | None = None
          ) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of a GET, 4xx answers included."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def run_labels(text: str, family_name: str) -> list[dict[str, str]]:
    return [dict(s.labels) for family in text_string_to_metric_families(text)
            if family.name == family_name for s in family.samples]


def report_loss(handle: ServerHandle, run_name: str) -> str:
    client = Client(handle.grpc_target)
    run_id = client.open_run(run_name).run_id
    client.report([batch(run_id, 1, [sample("loss", 1, 0.5)])])
    client.close()
    return run_id


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "scrape-token"
    path.write_text(SCRAPE_TOKEN + "\n")
    return path


@pytest.fixture
def token_server(tmp_path: Path, token_file: Path) -> Iterator[ServerHandle]:
    with start_in_thread(config(tmp_path, metrics_token_file=str(token_file))) as handle:
        yield handle


def test_a_scrape_without_the_right_token_gets_401_with_a_bearer_challenge(
        token_server: ServerHandle) -> None:
    for token in (None, "wrong-token", SCRAPE_TOKEN + "x", ""):
        status, headers, body = fetch(token_server.metrics_url, token)
        assert status == 401, token
        assert headers["WWW-Authenticate"].startswith("Bearer ")
        assert "raresignal_" not in body
    # Any path, not only /metrics.
    assert fetch(token_server.metrics_url.replace("/metrics", "/"))[0] == 401
    basic = urllib.request.Request(token_server.metrics_url,
                                   headers={"Authorization": f"Basic {SCRAPE_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(basic, timeout=10)
    assert raised.value.code == 401


def test_the_right_token_gets_the_metrics(token_server: ServerHandle) -> None:
    run_id = report_loss(token_server, "teamA-exp1")
    status, _, body = fetch(token_server.metrics_url, SCRAPE_TOKEN)
    assert status == 200
    assert {"run": "teamA-exp1", "run_id": run_id} in run_labels(body, "raresignal_loss")


def test_omitting_run_names_keeps_run_ids(tmp_path: Path) -> None:
    with start_in_thread(config(tmp_path, metrics_omit_run_names=True)) as handle:
        run_id = report_loss(handle, "teamA-secret-project")
        status, _, body = fetch(handle.metrics_url)
    assert status == 200
    assert run_labels(body, "raresignal_loss") == [{"run_id": run_id}]
    assert "teamA-secret-project" not in body
    assert "run=" not in body


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder)
    return folder


def client_context(certs: Path, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if with_certificate:
        context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    return context


@needs_openssl
def test_metrics_over_tls_with_the_servers_certificate(tmp_path: Path,
                                                       certificates: Path) -> None:
    tls = TlsConfig(certificate_chain=str(certificates / "server.pem"),
                    private_key=str(certificates / "server.key"))
    with start_in_thread(config(tmp_path, tls=tls, metrics_tls=True)) as handle:
        assert handle.metrics_url.startswith("https://")
        host, port = handle.metrics_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        # A client that connects and never starts its handshake holds only its own thread.
        with socket.create_connection((host, int(port)), timeout=10):
            status, _, body = fetch(handle.metrics_url,
                                    context=client_context(certificates,
                                                           with_certificate=False))
        assert status == 200 and "raresignal_runs" in body
        plain = handle.metrics_url.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(plain, timeout=10)


@needs_openssl
def test_metrics_over_mutual_tls_need_a_client_certificate_and_the_token(
        tmp_path: Path, certificates: Path, token_file: Path) -> None:
    tls = TlsConfig(certificate_chain=str(certificates / "server.pem"),
                    private_key=str(certificates / "server.key"),
                    root_certificates=str(certificates / "ca.pem"))
    settings = config(tmp_path, tls=tls, metrics_tls=True,
                      metrics_token_file=str(token_file))
    with start_in_thread(settings) as handle:
        anonymous = client_context(certificates, with_certificate=False)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            fetch(handle.metrics_url, SCRAPE_TOKEN, context=anonymous)
        holder = client_context(certificates, with_certificate=True)
        assert fetch(handle.metrics_url, context=holder)[0] == 401
        status, _, body = fetch(handle.metrics_url, SCRAPE_TOKEN, context=holder)
        assert status == 200 and "raresignal_runs" in body
        # A failed handshake does not stop the server answering the next scrape.
        assert fetch(handle.metrics_url, SCRAPE_TOKEN, context=holder)[0] == 200


def test_metrics_tls_without_a_certificate_or_an_empty_token_file_fails_to_start(
        tmp_path: Path) -> None:
    with pytest.raises(MetricsAccessError, match="--tls-cert"):
        start_in_thread(config(tmp_path, metrics_tls=True))
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(MetricsAccessError, match="empty"):
        start_in_thread(config(tmp_path, metrics_token_file=str(empty)))


def test_the_command_stops_with_one_line_for_an_unreadable_token_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-token"
    code = server_main(["server", "--db", str(tmp_path / "rs.db"), "--grpc-port", "0",
                        "--metrics-port", "0", "--health-port", "0",
                        "--metrics-token-file", str(missing)])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "metrics token file" in line and str(missing) in line


def test_the_settings_have_flags_variables_and_config_keys(tmp_path: Path) -> None:
    defaults = _server_config(server_settings(build_parser().parse_args(["server"]), {}), {})
    assert (defaults.metrics_token_file, defaults.metrics_tls, defaults.metrics_omit_run_names,
            defaults.max_health_watches) == (None, False, False, ServerConfig().max_health_watches)
    environ = {"RARESIGNAL_METRICS_TOKEN_FILE": "/run/token",
               "RARESIGNAL_METRICS_OMIT_RUN_NAMES": "yes",
               "RARESIGNAL_METRICS_TLS": "true", "RARESIGNAL_MAX_HEALTH_WATCHES": "7"}
    from_env = server_settings(build_parser().parse_args(["server"]), environ)
    assert (from_env["metrics_token_file"], from_env["metrics_omit_run_names"],
            from_env["metrics_tls"], from_env["max_health_watches"]) == (
        "/run/token", True, True, 7)
    flags = build_parser().parse_args(["server", "--no-metrics-tls", "--metrics-omit-run-names",
                                       "--max-health-watches", "3"])
    from_flags = server_settings(flags, environ)
    assert (from_flags["metrics_tls"], from_flags["metrics_omit_run_names"],
            from_flags["max_health_watches"]) == (False, True, 3)
    file = tmp_path / "server.yaml"
    file.write_text("metrics-tls: true\nmetrics_omit_run_names: false\n")
    from_file = server_settings(build_parser().parse_args(["server", "--config", str(file)]), {})
    assert (from_file["metrics_tls"], from_file["metrics_omit_run_names"]) == (True, False)
    with pytest.raises(SystemExit, match="RARESIGNAL_METRICS_TLS='maybe'"):
        server_settings(build_parser().parse_args(["server"]), {"RARESIGNAL_METRICS_TLS": "maybe"})
