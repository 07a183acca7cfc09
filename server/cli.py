"""The ``raresignal`` command: run the server, list runs, list or watch alerts."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from raresignal.protos.transport import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    client_channel_options,
)
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2

ENV_PREFIX = "RARESIGNAL_"

SERVER_EPILOG = """\
settings come from, in rising priority: defaults, --config FILE (YAML with the same keys,
e.g. `grpc_port: 50051`), environment variables RARESIGNAL_<KEY> (RARESIGNAL_DB,
RARESIGNAL_GRPC_PORT, RARESIGNAL_TOKENS_FILE, ...; RARESIGNAL_TOKENS holds tokens inline:
`tok1=teamA-*|shared-*,tok2`), then flags.

examples:
  raresignal server                                    # raresignal.db, ports 50051/9464/8081
  raresignal server --db /data/rs.db --tokens-file tokens.yaml
  raresignal server --grpc-port 0 --metrics-port 0 --health-port 0 --ready-file ready.json
  raresignal server --alertmanager-url http://alertmanager:9093 --rules my-rules.yaml
  raresignal server --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem

tokens file (YAML): `s3cret: ["teamA-*"]`, or lines `s3cret teamA-* shared-*`.
"""

MAIN_EPILOG = """\
examples:
  raresignal server --db runs.db
  raresignal runs --server 127.0.0.1:50051
  raresignal alerts --watch --run 3f2a9c0d1e2b4a5c
  raresignal alerts --state firing --token $TOKEN
"""

# name, type, default, help
_SERVER_SETTINGS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    ("db", str, "raresignal.db", "SQLite file (or :memory:)"),
    ("host", str, "0.0.0.0", "address to listen on"),
    ("grpc_port", int, DEFAULT_GRPC_PORT, "gRPC port (0: a free port)"),
    ("metrics_port", int, DEFAULT_METRICS_PORT, "Prometheus /metrics port (0: a free port)"),
    ("health_port", int, DEFAULT_HEALTH_PORT,
     "plaintext gRPC health port for probes (0: a free port)"),
    ("tokens_file", str, None, "bearer tokens: token -> run-name globs (YAML/JSON/lines)"),
    ("rules", str, None, "alert rules YAML (default: the rules shipped with raresignal)"),
    ("alertmanager_url", str, None, "Alertmanager base URL to push alerts to"),
    ("tls_cert", str, None, "server certificate (PEM); enables TLS"),
    ("tls_key", str, None, "server private key (PEM)"),
    ("tls_client_ca", str, None, "CA (PEM) client certificates must chain to: mutual TLS"),
    ("finished_run_ttl", float, 3600.0, "seconds a finished run stays in /metrics"),
    ("clock_interval", float, 1.0, "seconds between evaluations of the clock rules"),
    ("ready_file", str, None, "write endpoints as JSON here once listening"),
    ("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get(ENV_PREFIX + "SERVER",
                                                           f"127.0.0.1:{DEFAULT_GRPC_PORT}"),
                        help="server address host:port (env RARESIGNAL_SERVER)")
    parser.add_argument("--token", default=os.environ.get(ENV_PREFIX + "TOKEN"),
                        help="bearer token (env RARESIGNAL_TOKEN)")
    parser.add_argument("--tls-ca", default=os.environ.get(ENV_PREFIX + "TLS_CA"),
                        help="CA certificate (PEM) to verify a TLS server (env RARESIGNAL_TLS_CA)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raresignal",
        description="raresignal: a training-health monitor. Run the central server that "
                    "ingests what training jobs measure, evaluates alert rules and exposes "
                    "Prometheus metrics; or query it.",
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = commands.add_parser(
        "server", help="run the server",
        description="Run the raresignal server: gRPC ingest and alert APIs, a plaintext "
                    "health port, Prometheus /metrics, optional Alertmanager push.",
        epilog=SERVER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    server.add_argument("--config", help="YAML file with settings (keys as below, e.g. db)")
    for name, kind, default, text in _SERVER_SETTINGS:
        shown = f" (default: {default})" if default is not None else ""
        server.add_argument(_flag(name), dest=name, type=kind, default=None, help=text + shown)

    runs = commands.add_parser(
        "runs", help="list runs", description="List the runs the server knows.",
        epilog="examples:\n  raresignal runs\n  raresignal runs --all --server rs:50051",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_argument("--all", action="store_true", help="include finished runs")
    _add_client_options(runs)

    alerts = commands.add_parser(
        "alerts", help="list or watch alerts",
        description="List alerts, newest first, or watch alert state changes as they happen.",
        epilog="examples:\n  raresignal alerts\n  raresignal alerts --watch --run RUN_ID\n"
               "  raresignal alerts --state firing --rule RareSignalAbsorbed",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    alerts.add_argument("--watch", action="store_true", help="stream changes until Ctrl-C")
    alerts.add_argument("--run", default="", help="only this run id")
    alerts.add_argument("--rule", default="", help="only this rule, e.g. RunStalled")
    alerts.add_argument("--state", action="append", default=[],
                        choices=("pending", "firing", "resolved"), help="only these states")
    alerts.add_argument("--limit", type=int, default=100, help="at most this many (list)")
    alerts.add_argument("--all", action="store_true",
                        help="also list pending episodes that cleared without ever firing")
    _add_client_options(alerts)
    return parser


def server_settings(args: argparse.Namespace,
                    environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Defaults, then the config file, then RARESIGNAL_* variables, then flags."""
    kinds = {name: kind for name, kind, _, _ in _SERVER_SETTINGS}
    settings: dict[str, Any] = {name: default for name, _, default, _ in _SERVER_SETTINGS}
    if args.config:
        document = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(document, Mapping):
            raise SystemExit(f"{args.config}: expected a mapping of settings")
        for key, value in document.items():
            name = str(key).replace("-", "_")
            if name not in kinds:
                raise SystemExit(f"{args.config}: unknown setting {key!r} "
                                 f"(known: {', '.join(sorted(kinds))})")
            settings[name] = value if value is None else kinds[name](value)
    for name, kind in kinds.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            try:
                settings[name] = kind(raw)
            except ValueError:
                raise SystemExit(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid "
                                 f"{kind.__name__}") from None
    for name in kinds:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    return settings


def _server_config(settings: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    from raresignal.server.app import ServerConfig, TLSConfig
    from raresignal.server.auth import load_tokens, parse_tokens_env

    tokens: dict[str, list[str]] | None = None
    if settings["tokens_file"]:
        tokens = load_tokens(settings["tokens_file"])
    if environ.get(ENV_PREFIX + "TOKENS"):
        tokens = {**(tokens or {}), **parse_tokens_env(environ[ENV_PREFIX + "TOKENS"])}
    tls = None
    if settings["tls_cert"] or settings["tls_key"]:
        if not (settings["tls_cert"] and settings["tls_key"]):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = TLSConfig(settings["tls_cert"], settings["tls_key"], settings["tls_client_ca"])
    elif settings["tls_client_ca"]:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    return ServerConfig(
        db_path=settings["db"], host=settings["host"], grpc_port=settings["grpc_port"],
        metrics_port=settings["metrics_port"], health_port=settings["health_port"],
        tokens=tokens, rules_path=settings["rules"],
        alertmanager_url=settings["alertmanager_url"],
        finished_run_ttl_seconds=settings["finished_run_ttl"],
        clock_interval_seconds=settings["clock_interval"], tls=tls)


def _write_ready_file(path: str, text: str) -> None:
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text)
    partial.replace(target)  # atomic: a reader never sees half a file


def run_server(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    from raresignal.server.app import serve
    from raresignal.server.auth import TokensError
    from raresignal.server.rules import RulesError

    settings = server_settings(args, environ)
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _server_config(settings, environ)
    except TokensError as exc:
        print(f"raresignal: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if os.name == "posix":  # event-loop signal handlers exist on POSIX only
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)

        def ready(endpoints: Any) -> None:
            if settings["ready_file"]:
                _write_ready_file(settings["ready_file"], endpoints.to_json())

        await serve(config, stop=stop, ready=ready)

    try:
        asyncio.run(main())
    except RulesError as exc:
        print(f"raresignal: {exc}", file=sys.stderr)
        return 2
    return 0


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        return grpc.secure_channel(args.server, credentials, client_channel_options())
    return grpc.insecure_channel(args.server, client_channel_options())


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {args.token}"),) if args.token else ()


def _time(seconds: float) -> str:
    if not seconds:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
             for row in (header, *rows)]
    return "\n".join(lines)


def _state(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def run_runs(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        response = alerts_pb2_grpc.RunsStub(channel).ListRuns(
            alerts_pb2.ListRunsRequest(include_finished=args.all), metadata=_metadata(args),
            timeout=30)
    rows = [(run.run_id, run.run_name, _state(common_pb2.RunState, run.state, "RUN_STATE_"),
             str(run.last_step), _time(run.updated_at), str(run.world_size))
            for run in response.runs]
    print(format_table(("RUN_ID", "NAME", "STATE", "STEP", "LAST REPORT", "WORLD"), rows))
    return 0


def _alert_row(alert: common_pb2.Alert) -> tuple[str, ...]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
    return (_time(alert.started_at),
            _state(common_pb2.AlertState, alert.state, "ALERT_STATE_"), alert.severity,
            alert.rule, alert.run_name, labels or "-", f"{alert.value:.4g}", str(alert.step),
            alert.summary)


ALERT_HEADER = ("SINCE", "STATE", "SEVERITY", "ALERT", "RUN", "LABELS", "VALUE", "STEP",
                "SUMMARY")


def worth_listing(alerts: Sequence[common_pb2.Alert], include_unfired: bool
                  ) -> list[common_pb2.Alert]:
    """The alerts a person asked to see: a pending episode that cleared before its ``for``
    window was met never fired, and is left out unless asked for."""
    return [a for a in alerts if include_unfired or a.fired_at > 0
            or a.state != common_pb2.ALERT_STATE_RESOLVED]


def run_alerts(args: argparse.Namespace) -> int:
    states = [getattr(common_pb2, f"ALERT_STATE_{s.upper()}") for s in args.state]
    alert_filter = alerts_pb2.AlertFilter(run_id=args.run, rule=args.rule, states=states)
    with _channel(args) as channel:
        stub = alerts_pb2_grpc.AlertsStub(channel)
        if not args.watch:
            response = stub.ListAlerts(
                alerts_pb2.ListAlertsRequest(filter=alert_filter, limit=args.limit),
                metadata=_metadata(args), timeout=30)
            shown = worth_listing(response.alerts, include_unfired=args.all)
            print(format_table(ALERT_HEADER, [_alert_row(a) for a in shown]))
            return 0
        print("  ".join(ALERT_HEADER), flush=True)
        try:
            for event in stub.WatchAlerts(alerts_pb2.WatchAlertsRequest(filter=alert_filter),
                                          metadata=_metadata(args)):
                print("  ".join(_alert_row(event.alert)), flush=True)
        except KeyboardInterrupt:
            return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "server":
            return run_server(args)
        if args.command == "runs":
            return run_runs(args)
        return run_alerts(args)
    except grpc.RpcError as error:
        print(f"raresignal: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
