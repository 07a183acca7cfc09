"""The ``raresignal`` command: list runs, list or watch alerts, read, export, compare and
draw runs' series, and run the server.

The client commands need only the core install (grpc and the wire contract), so they work
wherever the agent is installed. The ``server`` command belongs to ``raresignal.server``
and is imported only when that command is asked for, so the client commands start
without loading the server; without the server extra, ``raresignal server`` says what to
install instead of failing at start-up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from raresignal.client import data_commands
from raresignal.client.channels import auth_metadata
from raresignal.client.options import (
    ClientError,
    add_client_options,
    channel_for,
    format_table,
    server_address,
    wall_time,
)
from raresignal.client.paging import follow_pages
from raresignal.protos.transport import TlsConfig
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2

MAIN_EPILOG = """\
examples:
  raresignal server --db runs.db
  raresignal runs --server 127.0.0.1:50051
  raresignal alerts --watch --run 3f2a9c0d1e2b4a5c
  raresignal alerts --state firing --token $TOKEN
  raresignal spool push --run-name exp-1
  raresignal series exp-1 probe_accuracy --label probe=rare
  raresignal export exp-1 --format jsonl --db runs.db
  raresignal compare baseline exp-1
  raresignal report exp-1 --out report/
"""

SERVER_EXTRA_HINT = "pip install 'raresignal[server]'"

Handler = Callable[[argparse.Namespace], int]


def _missing_dependency(error: ImportError) -> str | None:
    """The third-party module an ImportError names, or None when it is raresignal's own
    (a bug to report, not an extra to install)."""
    name = error.name or ""
    return None if name.split(".")[0] == "raresignal" else (name or str(error))


def _server_missing(missing: str) -> Handler:
    def explain(args: argparse.Namespace) -> int:
        print(f"raresignal: the server needs the server extra (missing module {missing!r}): "
              f"{SERVER_EXTRA_HINT}", file=sys.stderr)
        return 2

    return explain


SERVER_HELP = "run the server"


def _add_server_command(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                        wanted: bool) -> None:
    """``server`` as ``raresignal.server.cli`` defines it when that command is ``wanted``;
    otherwise only its line in the command list. When the server's dependencies are not
    installed, a stand-in that says how to install them."""
    if not wanted:
        commands.add_parser("server", help=SERVER_HELP, add_help=False)
        return
    try:
        from raresignal.server import cli as server_cli
    except ImportError as error:
        missing = _missing_dependency(error)
        if missing is None:
            raise
        stand_in = commands.add_parser(
            "server", help=f"run the server (needs the server extra: {SERVER_EXTRA_HINT})",
            description=f"The server is not installed here: {SERVER_EXTRA_HINT}")
        # It takes any arguments: whatever follows `server` is the server's to read.
        stand_in.set_defaults(handler=_server_missing(missing), takes_any_arguments=True)
        return
    server_cli.add_server_command(commands).set_defaults(handler=server_cli.run_server)


def build_parser(with_server: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_server=False`` leaves the server command's own
    options out (and the server's modules unloaded)."""
    parser = argparse.ArgumentParser(
        prog="raresignal",
        description="raresignal: a training-health monitor. Run the central server that "
                    "ingests what training jobs measure, evaluates alert rules and exposes "
                    "Prometheus metrics; or query it.",
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_server_command(commands, with_server)

    runs = commands.add_parser(
        "runs", help="list runs", description="List the runs the server knows.",
        epilog="examples:\n  raresignal runs\n  raresignal runs --all --server rs:50051",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_argument("--all", action="store_true", help="include finished runs")
    runs.add_argument("--limit", type=int, default=0,
                      help="at most this many runs, finished ones included (0: every run)")
    add_client_options(runs)
    runs.set_defaults(handler=run_runs)

    alerts = commands.add_parser(
        "alerts", help="list or watch alerts",
        description="List alerts, newest first, or watch alert state changes as they happen.",
        epilog="examples:\n  raresignal alerts\n  raresignal alerts --watch --run RUN_ID\n"
               "  raresignal alerts --state firing --rule RareProbeLossRise",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    alerts.add_argument("--watch", action="store_true", help="stream changes until Ctrl-C")
    alerts.add_argument("--run", default="", help="only this run id")
    alerts.add_argument("--rule", default="", help="only this rule, e.g. RunStalled")
    alerts.add_argument("--state", action="append", default=[],
                        choices=("pending", "firing", "resolved"), help="only these states")
    alerts.add_argument("--limit", type=int, default=100,
                        help="at most this many, read page by page (list; 0: every alert)")
    alerts.add_argument("--all", action="store_true",
                        help="also list pending episodes that cleared without ever firing")
    add_client_options(alerts)
    alerts.set_defaults(handler=run_alerts)

    spool = commands.add_parser(
        "spool", help="deliver spools that training processes left behind",
        description="A training process that ended before the server had all its reports "
                    "leaves them in a spool file; the next process of the same run name "
                    "delivers it by itself. `spool push` delivers them now, each to its own "
                    "run, and closes that run as failed. Needs the agent (torch) installed.",
        epilog="examples:\n  raresignal spool push --run-name llm-7b-sft\n"
               "  raresignal spool push --spool-dir /scratch/spool --server rs:50051",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    spool_commands = spool.add_subparsers(dest="spool_command", required=True,
                                          metavar="ACTION")
    push = spool_commands.add_parser(
        "push", help="deliver the left-behind spools",
        description="Deliver every spool no live process holds (of one run name, or all).")
    push.add_argument("--spool-dir", default=None,
                      help="the spool folder (MonitorConfig.spool_dir); default: the run's "
                           "folder under the user's cache, or every run's")
    push.add_argument("--run-name", default=None, help="only spools of this run name")
    push.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to try each spool before leaving it for later")
    add_client_options(push)
    push.set_defaults(handler=run_spool_push)
    data_commands.add_data_commands(commands)
    return parser


def _state(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ClientError(f"--limit must be 0 (no bound) or more, got {limit}")


def run_runs(args: argparse.Namespace) -> int:
    _check_limit(args.limit)
    with channel_for(args) as channel:
        stub = alerts_pb2_grpc.RunsStub(channel)
        metadata = auth_metadata(args.token)

        def fetch(token: str, page_size: int) -> tuple[Sequence[common_pb2.RunInfo], str]:
            response = stub.ListRuns(
                alerts_pb2.ListRunsRequest(include_finished=True, page_size=page_size,
                                           page_token=token),
                metadata=metadata, timeout=30)
            return response.runs, response.next_page_token

        runs = list(follow_pages(fetch, args.limit))
    shown = [run for run in runs if args.all or run.state == common_pb2.RUN_STATE_ACTIVE]
    rows = [(run.run_id, run.run_name, _state(common_pb2.RunState, run.state, "RUN_STATE_"),
             str(run.last_step), wall_time(run.updated_at), str(run.world_size))
            for run in shown]
    print(format_table(("RUN_ID", "NAME", "STATE", "STEP", "LAST REPORT", "WORLD"), rows))
    hidden = len(runs) - len(shown)
    if hidden:
        print(f"({hidden} finished run{'s' if hidden > 1 else ''} not shown; --all lists "
              "them)")
    return 0


def run_spool_push(args: argparse.Namespace) -> int:
    try:
        from raresignal.agent import spool_push
    except ImportError as error:
        missing = _missing_dependency(error)
        if missing is None:
            raise
        raise ClientError(f"spool push needs the agent (missing module {missing!r}): "
                          "pip install 'raresignal[agent]'") from error
    tls = TlsConfig(root_certificates=args.tls_ca) if args.tls_ca else None
    return spool_push.push(spool_push.spool_folders(args.spool_dir, args.run_name),
                           server_address(args.server, args.ready_file), args.run_name,
                           args.timeout, token=args.token, tls=tls)


def _alert_row(alert: common_pb2.Alert) -> tuple[str, ...]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
    return (wall_time(alert.started_at),
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
    _check_limit(args.limit)
    states = [getattr(common_pb2, f"ALERT_STATE_{s.upper()}") for s in args.state]
    alert_filter = alerts_pb2.AlertFilter(run_id=args.run, rule=args.rule, states=states)
    metadata = auth_metadata(args.token)
    with channel_for(args) as channel:
        stub = alerts_pb2_grpc.AlertsStub(channel)
        if not args.watch:
            def fetch(token: str, page_size: int) -> tuple[Sequence[common_pb2.Alert], str]:
                response = stub.ListAlerts(
                    alerts_pb2.ListAlertsRequest(filter=alert_filter, page_size=page_size,
                                                 page_token=token),
                    metadata=metadata, timeout=30)
                return response.alerts, response.next_page_token

            alerts = list(follow_pages(fetch, args.limit))
            shown = worth_listing(alerts, include_unfired=args.all)
            print(format_table(ALERT_HEADER, [_alert_row(a) for a in shown]))
            return 0
        print("  ".join(ALERT_HEADER), flush=True)
        try:
            for event in stub.WatchAlerts(alerts_pb2.WatchAlertsRequest(filter=alert_filter),
                                          metadata=metadata):
                print("  ".join(_alert_row(event.alert)), flush=True)
        except KeyboardInterrupt:
            return 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The server's modules load only for its own command and for the command list, whose
    # line for it says whether the server extra is installed.
    parser = build_parser(with_server=argv[:1] in (["server"], ["-h"], ["--help"], []))
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler: Handler = args.handler
    try:
        return handler(args)
    except ClientError as error:
        print(f"raresignal: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"raresignal: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
