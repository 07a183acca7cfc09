"""The commands that read a run's data: ``series``, ``export``, ``compare`` and ``report``.

Each reads from a server (``--server``, its env variable or ``--ready-file``) or straight
from a server's SQLite file (``--db``, read-only, no server needed).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TextIO

from raresignal.client.db_reader import DatabaseError, DatabaseSource
from raresignal.client.export import EXPORT_FORMATS, series_name, write_samples
from raresignal.client.options import (
    ClientError,
    add_client_options,
    channel_for,
    format_table,
    wall_time,
)
from raresignal.client.sources import RunNotFound, RunSource, ServerSource, find_run
from raresignal.protos.v1 import common_pb2

# What `compare` shows unless --metric says otherwise: whether each rare slice is still
# learned and keeps its directions, and whether training stays stable.
COMPARE_METRICS = ("probe_accuracy", "probe_retention", "probe_interference",
                   "probe_fisher_mass_ratio", "probe_bulk_residual", "sharpness_ratio")
DEMO_EXTRA_HINT = "pip install 'raresignal[demo]'"
REPORT_PNG = "report.png"
REPORT_HTML = "report.html"

def _add_source_options(parser: argparse.ArgumentParser) -> None:
    add_client_options(parser)
    parser.add_argument("--db", default=None, metavar="PATH",
                        help="read this server database (SQLite) file directly, read-only, "
                             "instead of asking a server (the server options are then "
                             "unused)")


@contextlib.contextmanager
def open_source(args: argparse.Namespace) -> Iterator[RunSource]:
    """The server or database file the options name; closed on leaving."""
    try:
        source: RunSource = (DatabaseSource(args.db) if args.db
                             else ServerSource(channel_for(args), args.token))
    except DatabaseError as error:
        raise ClientError(str(error)) from error
    try:
        yield source
    finally:
        source.close()


def _run(source: RunSource, reference: str) -> common_pb2.RunInfo:
    try:
        return find_run(source, reference)
    except RunNotFound as error:
        raise ClientError(str(error)) from error


def _label_pairs(pairs: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"--label takes key=value, got {pair!r}")
        labels[key] = value
    return labels


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    with open(path, "w", newline="", encoding="utf-8") as out:
        yield out


def run_series(args: argparse.Namespace) -> int:
    labels = _label_pairs(args.label)
    with open_source(args) as source:
        run = _run(source, args.run)
        samples = source.samples(run.run_id, args.metric, labels, args.since)
        if not samples:
            named = [series_name(s.metric, s.labels) for s in source.series(run.run_id)
                     if s.metric == args.metric]
            if named and not any(s == series_name(args.metric, labels) for s in named):
                raise ClientError(f"run {run.run_name!r} has no series "
                                  f"{series_name(args.metric, labels)}; it has "
                                  f"{', '.join(named)} (pick one with --label)")
    if args.csv:
        write_samples(samples, sys.stdout, "csv")
        return 0
    rows = [(str(s.step), f"{s.value:.6g}", wall_time(s.wall_time)) for s in samples]
    print(format_table(("STEP", "VALUE", "TIME"), rows))
    return 0


def run_export(args: argparse.Namespace) -> int:
    with open_source(args) as source:
        run = _run(source, args.run)
        every = (sample for info in source.series(run.run_id)
                 for sample in source.samples(run.run_id, info.metric, info.labels))
        with _output(args.out) as out:
            count = write_samples(every, out, args.format)
    if args.out:
        print(f"wrote {count} samples of run {run.run_name} ({run.run_id}) to {args.out}",
              file=sys.stderr)
    return 0


def _summary(samples: Sequence[common_pb2.Sample]) -> tuple[str, str, str]:
    """(latest, min, max) of a series, as table cells."""
    values = [s.value for s in samples]
    return f"{values[-1]:.4g}", f"{min(values):.4g}", f"{max(values):.4g}"


def run_compare(args: argparse.Namespace) -> int:
    metrics = tuple(args.metric) or COMPARE_METRICS
    with open_source(args) as source:
        runs = [_run(source, reference) for reference in args.runs]
        # series name -> run id -> (latest, min, max)
        table: dict[str, dict[str, tuple[str, str, str]]] = {}
        for run in runs:
            for info in source.series(run.run_id):
                if info.metric not in metrics:
                    continue
                samples = source.samples(run.run_id, info.metric, info.labels)
                if samples:
                    name = series_name(info.metric, info.labels)
                    table.setdefault(name, {})[run.run_id] = _summary(samples)
    order = {metric: index for index, metric in enumerate(metrics)}
    names = sorted(table, key=lambda name: (order[name.split("{", 1)[0]], name))
    header = ["SERIES"] + [f"{run.run_name} {column}" for run in runs
                           for column in ("LAST", "MIN", "MAX")]
    rows = [[name] + [cell for run in runs
                      for cell in table[name].get(run.run_id, ("-", "-", "-"))]
            for name in names]
    print(format_table(header, rows))
    if not rows:
        print(f"(no samples of {', '.join(metrics)} in these runs)")
    return 0


def _report_figure() -> ModuleType:
    """``client.report_figure``, or what to install when matplotlib is missing."""
    try:
        from raresignal.client import report_figure
    except ImportError as error:
        if (error.name or "").split(".")[0] == "raresignal":
            raise
        raise ClientError(f"the report needs matplotlib (missing module {error.name!r}): "
                          f"{DEMO_EXTRA_HINT}") from error
    return report_figure


def run_report(args: argparse.Namespace) -> int:
    from raresignal.client.report_page import report_html

    figure = _report_figure()
    out = Path(args.out)
    with open_source(args) as source:
        run = _run(source, args.run)
        series = {series_name(info.metric, info.labels):
                  [(s.step, s.value) for s in source.samples(run.run_id, info.metric,
                                                             info.labels)]
                  for info in source.series(run.run_id)
                  if info.metric in figure.DRAWN_METRICS}
        alerts = source.alerts(run.run_id)
    fired = [a for a in alerts if a.fired_at > 0]
    marks = [figure.AlertMark(int(a.step), a.rule)
             for a in sorted(fired, key=lambda a: a.step)]
    out.mkdir(parents=True, exist_ok=True)
    png = out / REPORT_PNG
    figure.write_report(series, marks,
                        f"raresignal: {run.run_name} ({run.run_id})", png)
    page = out / REPORT_HTML
    page.write_text(report_html(run, png.read_bytes(), fired), encoding="utf-8")
    print(f"wrote {png} and {page}")
    return 0


def _command(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             summary: str, description: str, examples: Sequence[str],
             handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=textwrap.fill(description, width=88),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def add_data_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``series``, ``export``, ``compare`` and ``report`` to the command line."""
    run_help = "the run: its id, or its name (the newest run of that name)"
    series = _command(
        commands, "series", "print one series of a run",
        "Print the stored samples of one metric of a run, oldest first. A labelled series "
        "(one per probe, per layer group) is named by all of its labels.",
        ["raresignal series exp-1 sharpness_ratio",
         "raresignal series exp-1 probe_accuracy --label probe=rare --since 1000",
         "raresignal series 3f2a9c0d1e2b4a5c loss --csv > loss.csv",
         "raresignal series exp-1 grad_norm --db raresignal.db"], run_series)
    series.add_argument("run", help=run_help)
    series.add_argument("metric", help="the metric, e.g. probe_accuracy")
    series.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a label of the series (repeat for each)")
    series.add_argument("--since", type=int, default=0, metavar="STEP",
                        help="only samples from this step on")
    series.add_argument("--csv", action="store_true", help="CSV instead of a table")
    _add_source_options(series)

    export = _command(
        commands, "export", "write every series of a run as CSV or JSON lines",
        "Write every sample of every series of a run, one per line, series by series.",
        ["raresignal export exp-1 --out exp-1.csv",
         "raresignal export exp-1 --format jsonl --db raresignal.db > exp-1.jsonl"],
        run_export)
    export.add_argument("run", help=run_help)
    export.add_argument("--format", choices=EXPORT_FORMATS, default="csv",
                        help="csv (metric,labels,step,value,wall_time) or jsonl")
    export.add_argument("--out", default=None, metavar="FILE", help="default: stdout")
    _add_source_options(export)

    compare = _command(
        commands, "compare", "compare runs side by side",
        "For each series of the chosen metrics, each run's latest value and its minimum and "
        f"maximum over the run. Default metrics: {', '.join(COMPARE_METRICS)}.",
        ["raresignal compare baseline exp-1 exp-2",
         "raresignal compare exp-1 exp-2 --metric loss --metric sharpness_ratio",
         "raresignal compare exp-1 exp-2 --db raresignal.db"], run_compare)
    compare.add_argument("runs", nargs="+", metavar="run", help=run_help)
    compare.add_argument("--metric", action="append", default=[],
                         help="a metric to compare (repeat for each)")
    _add_source_options(compare)

    report = _command(
        commands, "report", "draw a run's report (PNG and HTML)",
        f"Write {REPORT_PNG} (the probe, sharpness and subspace signals with the alerts "
        f"marked) and {REPORT_HTML} (that image and a table of the alerts that fired, in "
        f"one self-contained file) to a folder. Needs matplotlib: {DEMO_EXTRA_HINT}.",
        ["raresignal report exp-1 --out report/",
         "raresignal report exp-1 --out report/ --db raresignal.db"], run_report)
    report.add_argument("run", help=run_help)
    report.add_argument("--out", required=True, metavar="DIR",
                        help="the folder to write into (made if missing)")
    _add_source_options(report)
