"""What every client command shares: where the server is, how to reach it, and how to
print a table."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from raresignal.client.channels import open_channel
from raresignal.protos.transport import DEFAULT_GRPC_PORT, TlsConfig


class ClientError(Exception):
    """A problem with the command's own settings, reported in one line."""


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("RARESIGNAL_SERVER"),
                        help="server address host:port (env RARESIGNAL_SERVER; default: "
                             f"the --ready-file's, else 127.0.0.1:{DEFAULT_GRPC_PORT})")
    parser.add_argument("--ready-file", default=os.environ.get("RARESIGNAL_READY_FILE"),
                        help="the file `raresignal server --ready-file` wrote: its gRPC "
                             "address is used (env RARESIGNAL_READY_FILE)")
    parser.add_argument("--token", default=os.environ.get("RARESIGNAL_TOKEN"),
                        help="bearer token (env RARESIGNAL_TOKEN)")
    parser.add_argument("--tls-ca", default=os.environ.get("RARESIGNAL_TLS_CA"),
                        help="CA certificate (PEM) to verify a TLS server (env RARESIGNAL_TLS_CA)")


def server_address(server: str | None, ready_file: str | None) -> str:
    """Where to connect: ``--server``, else the gRPC address a server wrote to its ready
    file (servers started on free ports), else the default local port."""
    if server:
        return server
    if ready_file:
        try:
            endpoints = json.loads(Path(ready_file).read_text())
            return str(endpoints["grpc"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ClientError(f"cannot read the server address from the ready file "
                              f"{ready_file!r}: {error}") from error
    return f"127.0.0.1:{DEFAULT_GRPC_PORT}"


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the server the command's options name."""
    tls = TlsConfig(root_certificates=args.tls_ca) if args.tls_ca else None
    return open_channel(server_address(args.server, args.ready_file), tls)


def wall_time(seconds: float) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
             for row in (header, *rows)]
    return "\n".join(lines)
