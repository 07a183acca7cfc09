"""The HTTP server behind /metrics: an optional bearer token and optional TLS.

Run names, run ids and firing alerts of every team are on /metrics, so the endpoint can be
closed as tightly as the gRPC API: a scrape token compared in constant time (401 with
``WWW-Authenticate: Bearer`` otherwise), and TLS with the server's own certificate, which
verifies client certificates when the server runs mutual TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from raresignal.protos.transport import TlsConfig

log = logging.getLogger("raresignal.server")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# A connection that neither finishes its TLS handshake nor sends its request in this time
# is dropped, so a stalled client cannot hold a thread for ever.
CONNECTION_TIMEOUT_SECONDS = 30.0


class MetricsAccessError(ValueError):
    """A metrics token file or TLS setting that cannot be used."""


def read_token(path: str | Path) -> str:
    """The scrape token in ``path`` (surrounding whitespace ignored); never echoes it."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise MetricsAccessError(
            f"{path}: cannot read the metrics token file: {exc.strerror}") from None
    if not token:
        raise MetricsAccessError(f"{path}: the metrics token file is empty")
    if any(character.isspace() or not character.isprintable() for character in token):
        raise MetricsAccessError(
            f"{path}: the metrics token holds whitespace or control characters")
    return token


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def require_bearer_token(app: WsgiApp, token: str) -> WsgiApp:
    """``app`` answering only requests that carry ``Authorization: Bearer <token>``."""
    expected = _digest(token)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]
                ) -> Iterable[bytes]:
        scheme, _, offered = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        # Digests of equal length, compared in constant time: neither the token's content
        # nor its length shows in the response time.
        if scheme.lower() == "bearer" and hmac.compare_digest(_digest(offered.strip()),
                                                              expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [
            ("WWW-Authenticate", 'Bearer realm="raresignal metrics"'),
            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"a valid 'Authorization: Bearer <token>' header is required\n"]

    return guarded


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context with the gRPC port's certificate; it requires a client certificate
    signed by ``tls.root_certificates`` when that is set (mutual TLS)."""
    if tls.certificate_chain is None or tls.private_key is None:
        raise MetricsAccessError("TLS on the metrics port needs the server's certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate_chain, tls.private_key)
        if tls.root_certificates:
            context.load_verify_locations(cafile=tls.root_certificates)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise MetricsAccessError(f"metrics TLS: cannot load the certificate: {exc}") from None
    return context


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


class MetricsHttpServer(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server that does each TLS handshake on the connection's own thread,
    so one client that stalls mid-handshake does not stop the others being served."""

    daemon_threads = True
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT_SECONDS)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        with self.ssl_context.wrap_socket(request, server_side=True) as connection:
            super().finish_request(connection, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes and dropped connections are the client's business; a traceback
        # on stderr for each one is noise.
        log.debug("metrics connection from %s failed", client_address, exc_info=True)


def start_metrics_server(host: str, port: int, registry: CollectorRegistry, *,
                         token: str | None = None, context: ssl.SSLContext | None = None,
                         ) -> tuple[MetricsHttpServer, threading.Thread]:
    """Serves ``registry`` on ``host:port`` from a daemon thread; the server and its thread."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsHttpServer", (MetricsHttpServer,),
                        {"address_family": family, "ssl_context": context})
    app: WsgiApp = make_wsgi_app(registry)
    if token is not None:
        app = require_bearer_token(app, token)
    server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="raresignal-metrics",
                              daemon=True)
    thread.start()
    return server, thread
