"""Channels to the raresignal server, for every caller: the agent's sender, the command line
and the alert watcher.

A channel carries the transport settings both ends agree on (keepalive, message sizes),
TLS when TLS files are given, and each call carries the bearer token as metadata. Building
them in one place keeps every client able to reach a server that requires TLS or a token.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from raresignal.protos.transport import (
    AUTHORIZATION_METADATA_KEY,
    TlsConfig,
    client_channel_options,
)

Metadata = tuple[tuple[str, str], ...]


def open_channel(target: str, tls: TlsConfig | None = None,
                 extra_options: Sequence[tuple[str, int]] = ()) -> grpc.Channel:
    """A channel to ``target`` (``host:port``): TLS with ``tls``'s files, plaintext without.

    ``extra_options`` are added after the shared transport options, so a caller can tune
    what only it cares about (e.g. the reconnect backoff) without losing the keepalive
    the server's ping policy expects.
    """
    options = [*client_channel_options(), *extra_options]
    if tls is None:
        return grpc.insecure_channel(target, options)
    return grpc.secure_channel(target, tls.channel_credentials(), options)


def open_aio_channel(target: str, tls: TlsConfig | None = None,
                     extra_options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Channel:
    """:func:`open_channel` for asyncio callers."""
    options = [*client_channel_options(), *extra_options]
    if tls is None:
        return grpc.aio.insecure_channel(target, options)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options)


def auth_metadata(token: str | None) -> Metadata:
    """The metadata that authenticates a call with ``token``; empty without a token."""
    if not token:
        return ()
    return ((AUTHORIZATION_METADATA_KEY, f"Bearer {token}"),)
