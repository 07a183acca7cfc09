"""The ``raresignal server`` command: settings from defaults, a file, the environment and
flags, then the server until SIGINT or SIGTERM.

The ``raresignal`` entry point (``raresignal.client.cli``) offers this command beside the
client commands; ``python -m raresignal.server.cli server ...`` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from raresignal.protos.transport import TlsConfig
from raresignal.server.alerting.rules import RulesError
from raresignal.server.serving.alertmanager_access import AlertmanagerAccessError
from raresignal.server.serving.app import ServerConfig, serve
from raresignal.server.serving.auth import load_tokens, parse_tokens_env
from raresignal.server.serving.metrics_endpoint import MetricsAccessError
from raresignal.server.serving.quotas import Quotas
from raresignal.server.storage.open import StorageOpenError

ENV_PREFIX = "RARESIGNAL_"
_DEFAULTS = ServerConfig()
_QUOTA_HELP = {
    "max_runs_per_token": "runs a token may keep, finished ones included",
    "max_open_runs_per_token": "runs a token may have open at once",
    "max_series_per_token": "series across all of a token's runs",
    "max_senders_per_token": "sender ids across all of a token's runs",
    "max_run_metadata_bytes": "bytes of one run's config and tags (keys and values)",
}
_DEFAULT_PORTS = f"{_DEFAULTS.grpc_port}/{_DEFAULTS.metrics_port}/{_DEFAULTS.health_port}"

SERVER_EPILOG = f"""\
settings come from, in rising priority: defaults, --config FILE (YAML with the same keys,
e.g. `grpc_port: 50051`), environment variables RARESIGNAL_<KEY> (RARESIGNAL_DB,
RARESIGNAL_GRPC_PORT, RARESIGNAL_TOKENS_FILE, ...; RARESIGNAL_TOKENS holds tokens inline:
`tok1=teamA-*|shared-*,tok2`), then flags.

examples:
  raresignal server            # {_DEFAULTS.db_path} on {_DEFAULTS.host}, ports {_DEFAULT_PORTS}
  raresignal server --db /data/rs.db --tokens-file tokens.yaml
  raresignal server --grpc-port 0 --metrics-port 0 --health-port 0 --ready-file ready.json
  raresignal server --alertmanager-url http://alertmanager:9093 --rules my-rules.yaml
  raresignal server --alertmanager-url https://am:9093 --alertmanager-ca-file am-ca.pem \\
      --alertmanager-username raresignal --alertmanager-password-file am-password
  raresignal server --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem
  raresignal server --tls-cert server.pem --tls-key server.key --metrics-tls \\
      --metrics-token-file scrape-token --metrics-omit-run-names

tokens file (YAML): `s3cret: ["teamA-*"]`, or lines `s3cret teamA-* shared-*`.
"""

_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _boolean(value: str | bool) -> bool:
    """A yes/no setting from a variable or file: true/false, yes/no, on/off or 1/0."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE_WORDS + _FALSE_WORDS)}")


_boolean.__name__ = "boolean"  # what the error message for a bad variable calls it

# name, type, default, help; a server setting's default is ServerConfig's.
_SERVER_SETTINGS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    ("db", str, _DEFAULTS.db_path,
     "SQLite file (or :memory:), or postgresql://user@host:port/db (password from "
     "RARESIGNAL_DB_PASSWORD_FILE, PGPASSWORD or PGPASSFILE, never in the URL)"),
    ("host", str, _DEFAULTS.host, "address to listen on (0.0.0.0: every interface)"),
    ("grpc_port", int, _DEFAULTS.grpc_port, "gRPC port (0: a free port)"),
    ("metrics_port", int, _DEFAULTS.metrics_port, "Prometheus /metrics port (0: a free port)"),
    ("health_port", int, _DEFAULTS.health_port,
     "plaintext gRPC health port for probes (0: a free port)"),
    ("tokens_file", str, None, "bearer tokens: token -> run-name globs (YAML/JSON/lines)"),
    ("rules", str, _DEFAULTS.rules_path,
     "alert rules YAML (default: the rules shipped with raresignal)"),
    ("alertmanager_url", str, _DEFAULTS.alertmanager_url,
     "Alertmanager base URL to push alerts to"),
    ("alertmanager_username", str, _DEFAULTS.alertmanager_username,
     "Alertmanager basic-auth username (with --alertmanager-password-file)"),
    ("alertmanager_password_file", str, _DEFAULTS.alertmanager_password_file,
     "file holding the Alertmanager basic-auth password"),
    ("alertmanager_bearer_token_file", str, _DEFAULTS.alertmanager_bearer_token_file,
     "file holding a bearer token for Alertmanager"),
    ("alertmanager_ca_file", str, _DEFAULTS.alertmanager_ca_file,
     "CA (PEM) an https Alertmanager's certificate must chain to"),
    ("tls_cert", str, None, "server certificate (PEM); enables TLS"),
    ("tls_key", str, None, "server private key (PEM)"),
    ("tls_client_ca", str, None, "CA (PEM) client certificates must chain to: mutual TLS"),
    ("metrics_token_file", str, _DEFAULTS.metrics_token_file,
     "file holding the bearer token a scrape of /metrics must send (none: no token)"),
    ("metrics_tls", _boolean, _DEFAULTS.metrics_tls,
     "serve /metrics over TLS with --tls-cert/--tls-key; with --tls-client-ca a scrape "
     "needs a client certificate too"),
    ("metrics_omit_run_names", _boolean, _DEFAULTS.metrics_omit_run_names,
     "leave the run label (run names) off /metrics; run_id stays"),
    ("max_health_watches", int, _DEFAULTS.max_health_watches,
     "Health.Watch streams served at once; more get RESOURCE_EXHAUSTED"),
    *((name, int, getattr(_DEFAULTS.quotas, name),
       f"{text}; beyond it RESOURCE_EXHAUSTED (without tokens: all callers together)")
      for name, text in _QUOTA_HELP.items()),
    ("alerts_kept_per_run", int, _DEFAULTS.retention.alerts_per_run,
     "resolved alerts (with their transitions) a run keeps; older ones are deleted"),
    ("retention_days", int, _DEFAULTS.retention.max_age_days,
     "PostgreSQL: days of samples kept; older days' partitions are dropped (0: keep all)"),
    ("finished_run_ttl", float, _DEFAULTS.finished_run_ttl_seconds,
     "seconds a finished run stays in /metrics"),
    ("clock_interval", float, _DEFAULTS.clock_interval_seconds,
     "seconds between evaluations of the clock rules"),
    ("lease_ttl", float, _DEFAULTS.lease_ttl_seconds,
     "replicas on PostgreSQL: seconds a run's evaluation lease outlives its replica's "
     "last renewal before another replica takes the run over"),
    ("lease_heartbeat", float, _DEFAULTS.lease_heartbeat_seconds,
     "replicas on PostgreSQL: seconds between renewals of this replica's leases "
     "(shorter than --lease-ttl)"),
    ("replica_id", str, _DEFAULTS.replica_id,
     "replicas on PostgreSQL: this replica's name in the lease table (default: host, "
     "process id and a random suffix)"),
    ("database_check", float, _DEFAULTS.database_check_seconds,
     "seconds between readiness pings of the database; while one fails the API services "
     "report NOT_SERVING on the health port"),
    ("ready_file", str, None, "write endpoints as JSON here once listening"),
    ("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_server_command(
        commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Adds the ``server`` command, with a flag per setting, to ``commands``."""
    server = commands.add_parser(
        "server", help="run the server",
        description="Run the raresignal server: gRPC ingest and alert APIs, a plaintext "
                    "health port, Prometheus /metrics, optional Alertmanager push.",
        epilog=SERVER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        # No prefixes: `--alertmanager-password SECRET` must not pass for the file flag.
        allow_abbrev=False)
    server.add_argument("--config", help="YAML file with settings (keys as below, e.g. db)")
    for name, kind, default, text in _SERVER_SETTINGS:
        shown = f" (default: {default})" if default is not None else ""
        if kind is _boolean:
            server.add_argument(_flag(name), dest=name, default=None, help=text + shown,
                                action=argparse.BooleanOptionalAction)
        else:
            server.add_argument(_flag(name), dest=name, type=kind, default=None,
                                help=text + shown)
    return server


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m raresignal.server.cli``: the ``server`` command alone."""
    parser = argparse.ArgumentParser(
        prog="raresignal",
        description="Run the raresignal server. The `raresignal` command also lists runs "
                    "and alerts.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_server_command(commands)
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


def _server_config(settings: Mapping[str, Any], environ: Mapping[str, str]) -> ServerConfig:
    tokens: dict[str, list[str]] | None = None
    if settings["tokens_file"]:
        tokens = load_tokens(settings["tokens_file"])
    if environ.get(ENV_PREFIX + "TOKENS"):
        tokens = {**(tokens or {}), **parse_tokens_env(environ[ENV_PREFIX + "TOKENS"])}
    tls = None
    if settings["tls_cert"] or settings["tls_key"]:
        if not (settings["tls_cert"] and settings["tls_key"]):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = TlsConfig(certificate_chain=settings["tls_cert"], private_key=settings["tls_key"],
                        root_certificates=settings["tls_client_ca"])
    elif settings["tls_client_ca"]:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    return ServerConfig(
        db_path=settings["db"], host=settings["host"], grpc_port=settings["grpc_port"],
        metrics_port=settings["metrics_port"], health_port=settings["health_port"],
        tokens=tokens, rules_path=settings["rules"],
        alertmanager_url=settings["alertmanager_url"],
        alertmanager_username=settings["alertmanager_username"],
        alertmanager_password_file=settings["alertmanager_password_file"],
        alertmanager_bearer_token_file=settings["alertmanager_bearer_token_file"],
        alertmanager_ca_file=settings["alertmanager_ca_file"],
        finished_run_ttl_seconds=settings["finished_run_ttl"],
        clock_interval_seconds=settings["clock_interval"], tls=tls,
        lease_ttl_seconds=settings["lease_ttl"],
        lease_heartbeat_seconds=settings["lease_heartbeat"],
        replica_id=settings["replica_id"],
        database_check_seconds=settings["database_check"],
        metrics_token_file=settings["metrics_token_file"],
        metrics_tls=settings["metrics_tls"],
        metrics_omit_run_names=settings["metrics_omit_run_names"],
        max_health_watches=settings["max_health_watches"],
        quotas=Quotas(**{name: settings[name] for name in _QUOTA_HELP}),
        retention=replace(_DEFAULTS.retention, alerts_per_run=settings["alerts_kept_per_run"],
                          max_age_days=settings["retention_days"]))


def _write_ready_file(path: str, text: str) -> None:
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text)
    partial.replace(target)  # atomic: a reader never sees half a file


def run_server(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    settings = server_settings(args, environ)
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _server_config(settings, environ)
    except ValueError as exc:  # a TokensError or a quota below 1
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
    except (RulesError, AlertmanagerAccessError, StorageOpenError,
            MetricsAccessError) as exc:
        print(f"raresignal: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_server(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
