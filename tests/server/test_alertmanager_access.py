"""The server reaches an Alertmanager behind basic auth, a bearer token or https with its
own CA, with secrets read from files and never logged. A small HTTP server on loopback
stands in for Alertmanager (the real one has no auth) and checks the Authorization
header."""

from __future__ import annotations

import base64
import http.server
import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from server_support import Client, batch, config, find, sample, scrape, wait_for
from tls_certificates import make_certificates, needs_openssl

from raresignal.server.serving.alertmanager_access import AlertmanagerAccessError
from raresignal.server.serving.app import ServerHandle, start_in_thread

PASSWORD = "pw-Zq9-secret"
BEARER = "tok-Xk4-secret"


@dataclass
class FakeAlertmanager:
    """Answers POST /api/v2/alerts with 200 when the Authorization header is ``expected``,
    401 otherwise; keeps each request's header."""

    expected: str | None
    headers: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def received(self) -> list[str | None]:
        with self.lock:
            return list(self.headers)


def _handler(fake: FakeAlertmanager) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            header = self.headers.get("Authorization")
            with fake.lock:
                fake.headers.append(header)
            status = 200 if fake.expected is None or header == fake.expected else 401
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test reads what it needs from ``fake``

    return Handler


@pytest.fixture
def serve_fake() -> Iterator[object]:
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start(expected: str | None, tls: ssl.SSLContext | None = None) -> FakeAlertmanager:
        fake = FakeAlertmanager(expected)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
        scheme = "http"
        if tls is not None:
            httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
            scheme = "https"
        fake.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        servers.append((httpd, thread))
        return fake

    yield start
    for httpd, thread in servers:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def _fire(server: ServerHandle, name: str) -> None:
    client = Client(server.grpc_target)
    run_id = client.open_run(name).run_id
    client.report([batch(run_id, 1, [sample("nonfinite_values", 1, 2.0)])])
    client.close()


def _outcome(server: ServerHandle, outcome: str) -> list[float]:
    return find(scrape(server.metrics_url), "raresignal_alertmanager_notifications_total",
                outcome=outcome)


def _secret_file(tmp_path: Path, name: str, secret: str) -> str:
    path = tmp_path / name
    path.write_text(secret + "\n")  # as `kubectl create secret --from-file` often holds it
    return str(path)


def _no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage()
        assert PASSWORD not in text and BEARER not in text, text


def test_basic_auth_reads_the_password_from_a_file(
        tmp_path: Path, serve_fake: object, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    expected = "Basic " + base64.b64encode(f"raresignal:{PASSWORD}".encode()).decode()
    fake = serve_fake(expected)  # type: ignore[operator]
    settings = config(tmp_path, alertmanager_url=fake.url, alertmanager_username="raresignal",
                      alertmanager_password_file=_secret_file(tmp_path, "pw", PASSWORD))
    with start_in_thread(settings) as server:
        _fire(server, "basic-run")
        wait_for(lambda: _outcome(server, "sent") == [1.0])
    assert fake.received() == [expected]
    _no_secret_logged(caplog)


def test_bearer_token_is_read_from_a_file_and_a_wrong_one_is_refused(
        tmp_path: Path, serve_fake: object, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = serve_fake(f"Bearer {BEARER}")  # type: ignore[operator]
    settings = config(tmp_path / "right", alertmanager_url=fake.url,
                      alertmanager_bearer_token_file=_secret_file(tmp_path, "tok", BEARER))
    (tmp_path / "right").mkdir()
    with start_in_thread(settings) as server:
        _fire(server, "bearer-run")
        wait_for(lambda: _outcome(server, "sent") == [1.0])
    assert fake.received() == [f"Bearer {BEARER}"]

    wrong = _secret_file(tmp_path, "wrong", BEARER + "-revoked")
    (tmp_path / "wrong-db").mkdir()
    with start_in_thread(config(tmp_path / "wrong-db", alertmanager_url=fake.url,
                                alertmanager_bearer_token_file=wrong)) as server:
        _fire(server, "bearer-run")
        # A 401 will not heal on retry: counted as failed at once, nothing retried.
        wait_for(lambda: _outcome(server, "failed") == [1.0])
        assert _outcome(server, "retried") in ([], [0.0])
    assert fake.received()[-1] == f"Bearer {BEARER}-revoked"
    _no_secret_logged(caplog)


@needs_openssl
def test_https_alertmanager_is_verified_against_the_given_ca(
        tmp_path: Path, serve_fake: object) -> None:
    make_certificates(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    fake = serve_fake(None, tls)  # type: ignore[operator]
    (tmp_path / "trusted").mkdir()
    with start_in_thread(config(tmp_path / "trusted", alertmanager_url=fake.url,
                                alertmanager_ca_file=str(tmp_path / "ca.pem"))) as server:
        _fire(server, "https-run")
        wait_for(lambda: _outcome(server, "sent") == [1.0])
    assert len(fake.received()) == 1

    # Without the CA the certificate does not verify: the POST never reaches the handler.
    (tmp_path / "untrusted").mkdir()
    with start_in_thread(config(tmp_path / "untrusted", alertmanager_url=fake.url)) as server:
        _fire(server, "https-run")
        wait_for(lambda: _outcome(server, "retried") >= [1.0])
        assert _outcome(server, "sent") in ([], [0.0])
    assert len(fake.received()) == 1


@pytest.mark.parametrize(("overrides", "message"), [
    ({"alertmanager_username": "u", "alertmanager_bearer_token_file": "tok"},
     "basic auth and bearer token exclude each other"),
    ({"alertmanager_username": "u"}, "needs both a username and a password file"),
    ({"alertmanager_password_file": "pw"}, "needs both a username and a password file"),
    ({"alertmanager_username": "a:b", "alertmanager_password_file": "pw"}, "may not hold ':'"),
    ({"alertmanager_password_file": "empty", "alertmanager_username": "u"},
     "the Alertmanager password file is empty"),
    ({"alertmanager_bearer_token_file": "missing"}, "cannot read the Alertmanager bearer"),
    ({"alertmanager_bearer_token_file": "spaced"}, "bearer token holds whitespace"),
    ({"alertmanager_url": f"http://u:{PASSWORD}@127.0.0.1:1"}, "may not hold credentials"),
    ({"alertmanager_url": "ftp://127.0.0.1"}, "must be http:// or https://"),
    ({"alertmanager_ca_file": "ca.pem"}, "CA file needs an https:// URL"),
    ({"alertmanager_url": "https://127.0.0.1:1", "alertmanager_ca_file": "pw"},
     "cannot load the Alertmanager CA"),
])
def test_unusable_alertmanager_settings_stop_the_server_without_showing_secrets(
        tmp_path: Path, overrides: dict[str, str], message: str) -> None:
    for name, text in (("pw", PASSWORD), ("tok", BEARER), ("empty", ""),
                       ("spaced", f"{BEARER} x"), ("ca.pem", "")):
        (tmp_path / name).write_text(text + "\n")
    settings = {"alertmanager_url": "http://127.0.0.1:1", **overrides}
    for key, value in settings.items():
        if key.endswith("_file"):
            settings[key] = str(tmp_path / value)
    with pytest.raises(AlertmanagerAccessError) as raised:
        start_in_thread(config(tmp_path, **settings))
    assert message in str(raised.value)
    assert PASSWORD not in str(raised.value) and BEARER not in str(raised.value)
