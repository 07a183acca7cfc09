"""Transport settings both ends must agree on (keepalive, sizes, metadata keys, TLS files).

gRPC closes a connection with GOAWAY ("too_many_pings") when a client pings more often
than the server permits, so the agent's keepalive and the server's ping policy are
defined once, here, and imported by both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9464
DEFAULT_HEALTH_PORT = 8081

# Client pings every 30 s and waits 10 s for the answer; the server accepts pings
# down to every 20 s, and pings without active calls (a sender may sit idle).
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 20_000

# A report batch is a few hundred samples; 4 MiB bounds a hostile one.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

AUTHORIZATION_METADATA_KEY = "authorization"  # value: "Bearer <token>"
REJECTED_SEQUENCE_METADATA_KEY = "raresignal-rejected-sequence"


def client_channel_options() -> list[tuple[str, int]]:
    """Channel options for the agent and the CLI."""
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def server_options() -> list[tuple[str, int]]:
    """Server options matching :func:`client_channel_options`."""
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for one end of a TLS connection.

    ``certificate_chain`` and ``private_key`` are this end's own pair: required on the
    server, and on a client they turn on mutual TLS. ``root_certificates`` is the CA that
    signed the other end: on a client, the server's CA (empty: the system's trust store);
    on the server, the clients' CA, which makes TLS mutual (only clients holding a
    certificate it signed may connect).
    """

    certificate_chain: str | None = None
    private_key: str | None = None
    root_certificates: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TLS needs both certificate_chain and private_key, or neither")

    @staticmethod
    def _load(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a client channel."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._load(self.root_certificates),
            private_key=self._load(self.private_key),
            certificate_chain=self._load(self.certificate_chain))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for the server's port; mutual TLS when ``root_certificates`` is set."""
        if self.certificate_chain is None or self.private_key is None:
            raise ValueError("a TLS server needs certificate_chain and private_key")
        client_ca = self._load(self.root_certificates)
        return grpc.ssl_server_credentials(
            [(self._load(self.private_key), self._load(self.certificate_chain))],
            root_certificates=client_ca, require_client_auth=client_ca is not None)
