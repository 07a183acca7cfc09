"""Soak: a steady mixed load on one server for a fixed time, watching for slow decay.

A leak or a list that grows without bound rarely shows in a 5-second benchmark; it shows
as memory that climbs minute after minute, or a latency that creeps up as tables fill.
This starts ``raresignal server`` in its own process (SQLite in a temporary directory),
opens ``--runs`` runs and drives them with ``--senders`` raw gRPC clients (threads of this
process, each one long-lived ``Ingest.Report`` stream, as an agent keeps one), paced to
``--rate`` samples per second in total, every run reporting the same ten series at
advancing steps. Beside them a reader pages through ``ListRuns`` and ``ListAlerts`` every
``--read-interval`` seconds, as a dashboard or the CLI would.

With ``--churn-per-minute N`` runs come and go as jobs do: N times a minute, spread over
the senders, a sender closes one of its runs (completed) and opens a new one in its place,
between two batches. The server then runs with ``--finished-run-ttl`` (short), so finished
runs leave /metrics, the live state and the alert engine during the soak; each row also
counts the runs /metrics shows, which stays near ``--runs`` plus the runs finished within
the TTL if expiry works, and grows with every churned run if it does not.

Every ``--window`` seconds it prints one row: the server's RSS, the samples per second
delivered, and the p50/p99 latency of ReportBatch (from when the batch was due, so a
server that falls behind cannot hide it), ListRuns and ListAlerts in that window. At
the end, a verdict on the windows after ``--warmup``:

* RSS growth per minute: the least-squares slope of RSS over time. A steady server is
  flat (noise of a few hundred KiB); a leak is a steady positive slope.
* latency drift: the last window's p50 and p99 over the first's, per RPC. About 1 is
  steady; a ratio that grows with ``--seconds`` is decay.

It exits 1 when the slope is above ``--max-rss-growth`` MiB/min or a p99 ratio is above
``--max-drift``, when less than 95% of the offered samples were delivered (the server
fell behind, and latency then measures its backlog: offer less), or when any call failed
or any batch was acknowledged as a duplicate.

    python benchmarks/soak.py                                  # 3 minutes, 16 senders
    python benchmarks/soak.py --seconds 600 --senders 32 --runs 64 --rate 40000
    python benchmarks/soak.py --seconds 60 --window 5 --warmup 10          # a quick look
    python benchmarks/soak.py --rate 10000 --churn-per-minute 60 --finished-run-ttl 20
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import (
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
)
from raresignal.server.process import ServerProcess

# Ten series per step, four of them under default alert rules, so the rule engine works.
SERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("loss", {}), ("grad_norm", {}), ("learning_rate", {}), ("update_to_weight_ratio", {}),
    ("step_duration_seconds", {}), ("sharpness_ratio", {}),
    ("probe_retention", {"probe": "rare"}), ("probe_retention", {"probe": "common"}),
    ("probe_fisher_mass_ratio", {"probe": "rare"}), ("probe_loss", {"probe": "rare"}),
)
APPLIED = ingest_pb2.ReportAck.OUTCOME_APPLIED
CALL_TIMEOUT_SECONDS = 60.0
RUN_ID_LABEL = re.compile(r'run_id="([0-9a-f]+)"')
SETTLE_SECONDS = 1.0
# Below this share of the offered rate delivered, the server is behind, not steady.
KEPT_UP = 0.95
# One row of the table: its end (seconds in), then p50/p99 of ReportBatch, ListRuns and
# ListAlerts in milliseconds.
Row = tuple[float, tuple[float, float], tuple[float, float], tuple[float, float]]


@dataclass
class Window:
    """What happened in one window of time (filled by several threads, under a lock)."""

    report: list[float] = field(default_factory=list)
    list_runs: list[float] = field(default_factory=list)
    list_alerts: list[float] = field(default_factory=list)
    samples: int = 0


class Recorder:
    """Latencies and counts, by window; failures and duplicates for the whole soak."""

    def __init__(self, window_seconds: float, started: float) -> None:
        self.window_seconds = window_seconds
        self.started = started
        self.lock = threading.Lock()
        self.windows: dict[int, Window] = {}
        self.failures: dict[str, int] = {}
        self.duplicates = 0
        self.churned = 0

    def _window(self, at: float) -> Window:
        index = int((at - self.started) // self.window_seconds)
        return self.windows.setdefault(index, Window())

    def report(self, at: float, latency: float, samples: int) -> None:
        with self.lock:
            window = self._window(at)
            window.report.append(latency)
            window.samples += samples

    def read(self, kind: str, at: float, latency: float) -> None:
        with self.lock:
            getattr(self._window(at), kind).append(latency)

    def failed(self, what: str, error: grpc.RpcError) -> None:
        with self.lock:
            key = f"{what}: {error.code().name}"
            self.failures[key] = self.failures.get(key, 0) + 1


def make_batch(run_id: str, sender_id: str, sequence: int, first_step: int,
               steps: int) -> ingest_pb2.ReportBatch:
    now = time.time()
    samples = [common_pb2.Sample(metric=metric, labels=labels, step=step,
                                 value=1.0 + 0.001 * (step % 100), wall_time=now)
               for step in range(first_step, first_step + steps)
               for metric, labels in SERIES]
    return ingest_pb2.ReportBatch(run_id=run_id, sender_id=sender_id, sequence=sequence,
                                  samples=samples)


def churn(ingest: ingest_pb2_grpc.IngestStub, runs: list[str], turn: int) -> None:
    """Closes one of ``runs`` (completed) and puts a newly opened run in its place."""
    slot = turn % len(runs)
    ingest.CloseRun(ingest_pb2.CloseRunRequest(run_id=runs[slot],
                                               state=common_pb2.RUN_STATE_COMPLETED),
                    timeout=CALL_TIMEOUT_SECONDS)
    runs[slot] = ingest.OpenRun(ingest_pb2.OpenRunRequest(
        run_name=f"soak-churned-{runs[slot]}", world_size=1),
        timeout=CALL_TIMEOUT_SECONDS).run_id


def sender(target: str, runs: list[str], name: str, interval: float, steps: int,
           until: float, recorder: Recorder, churn_interval: float = float("inf"),
           churn_offset: float = 0.0) -> None:
    """One agent-like client: one Report stream, a batch every ``interval`` seconds,
    cycling over its runs, and every ``churn_interval`` seconds one run replaced by a new
    one; latency counts from when each batch was due."""
    channel = grpc.insecure_channel(target, client_channel_options())
    ingest = ingest_pb2_grpc.IngestStub(channel)
    outgoing: queue.Queue[ingest_pb2.ReportBatch | None] = queue.Queue()
    acks: Iterator[ingest_pb2.ReportAck] = ingest.Report(
        iter(outgoing.get, None), timeout=until - time.monotonic() + CALL_TIMEOUT_SECONDS)
    runs = list(runs)
    sequences: dict[str, int] = {}
    due = time.monotonic()
    churn_due = due + churn_offset
    turn = 0
    try:
        while due < until:
            time.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() >= churn_due:
                churn(ingest, runs, turn)
                with recorder.lock:
                    recorder.churned += 1
                churn_due += churn_interval
            run_id = runs[turn % len(runs)]
            sequences[run_id] = sequences.get(run_id, 0) + 1
            sequence = sequences[run_id]
            outgoing.put(make_batch(run_id, name, sequence, (sequence - 1) * steps, steps))
            ack = next(acks)
            done = time.monotonic()
            if ack.outcome != APPLIED:
                with recorder.lock:
                    recorder.duplicates += 1
            recorder.report(done, done - due, ack.samples_applied)
            turn += 1
            due += interval
    except grpc.RpcError as error:
        recorder.failed("Report", error)
    finally:
        outgoing.put(None)
        channel.close()


def reader(target: str, interval: float, until: float, recorder: Recorder) -> None:
    """Pages through every run and the first page of alerts, every ``interval`` seconds."""
    channel = grpc.insecure_channel(target, client_channel_options())
    runs = alerts_pb2_grpc.RunsStub(channel)
    alerts = alerts_pb2_grpc.AlertsStub(channel)
    due = time.monotonic()
    while due < until:
        time.sleep(max(0.0, due - time.monotonic()))
        try:
            started = time.monotonic()
            token = ""
            while True:
                page = runs.ListRuns(alerts_pb2.ListRunsRequest(
                    include_finished=True, page_size=100, page_token=token),
                    timeout=CALL_TIMEOUT_SECONDS)
                token = page.next_page_token
                if not token:
                    break
            done = time.monotonic()
            recorder.read("list_runs", done, done - started)
            started = time.monotonic()
            alerts.ListAlerts(alerts_pb2.ListAlertsRequest(page_size=100),
                              timeout=CALL_TIMEOUT_SECONDS)
            done = time.monotonic()
            recorder.read("list_alerts", done, done - started)
        except grpc.RpcError as error:
            recorder.failed("read", error)
        due += interval
    channel.close()


def runs_on_metrics(url: str) -> int:
    """How many runs one /metrics scrape shows series of."""
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_SECONDS) as response:
        return len(set(RUN_ID_LABEL.findall(response.read().decode())))


def rss_mib(server: ServerProcess) -> float:
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def quantiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds (NaN for none)."""
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    return (statistics.median(ordered) * 1e3,
            ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return float("nan")
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def open_runs(target: str, count: int) -> list[str]:
    with grpc.insecure_channel(target, client_channel_options()) as channel:
        ingest = ingest_pb2_grpc.IngestStub(channel)
        return [ingest.OpenRun(ingest_pb2.OpenRunRequest(run_name=f"soak-{index}",
                                                         world_size=1),
                               timeout=CALL_TIMEOUT_SECONDS).run_id
                for index in range(count)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0,
                        help="how long to soak (default %(default)s)")
    parser.add_argument("--senders", type=int, default=16,
                        help="concurrent Report streams (default %(default)s)")
    parser.add_argument("--runs", type=int, default=64,
                        help="runs, shared round-robin by the senders (default %(default)s)")
    parser.add_argument("--rate", type=float, default=20_000.0,
                        help="samples per second offered, all senders together "
                             "(default %(default)s)")
    parser.add_argument("--steps-per-batch", type=int, default=10,
                        help=f"steps per batch, {len(SERIES)} samples each "
                             "(default %(default)s)")
    parser.add_argument("--read-interval", type=float, default=0.5,
                        help="seconds between ListRuns/ListAlerts rounds (default %(default)s)")
    parser.add_argument("--churn-per-minute", type=float, default=0.0,
                        help="runs closed and replaced by new ones per minute, all senders "
                             "together (default %(default)s: none)")
    parser.add_argument("--finished-run-ttl", type=float, default=20.0,
                        help="the server's finished-run TTL in seconds, with churn "
                             "(default %(default)s)")
    parser.add_argument("--window", type=float, default=15.0,
                        help="seconds per row of the table (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds left out of the verdict (default %(default)s)")
    parser.add_argument("--max-rss-growth", type=float, default=2.0,
                        help="MiB per minute the verdict tolerates (default %(default)s)")
    parser.add_argument("--max-drift", type=float, default=2.0,
                        help="last/first window p99 ratio the verdict tolerates "
                             "(default %(default)s)")
    args = parser.parse_args(argv)
    if args.senders < 1 or args.runs < args.senders:
        parser.error("need at least one sender and at least as many runs as senders")
    if args.warmup + 2 * args.window > args.seconds:
        parser.error("--seconds must leave at least two windows after --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batch_samples = args.steps_per_batch * len(SERIES)
    interval = args.senders * batch_samples / args.rate  # each sender's pace
    churn_interval = (args.senders * 60.0 / args.churn_per_minute if args.churn_per_minute
                      else float("inf"))  # each sender's, staggered below
    if args.churn_per_minute:
        os.environ["RARESIGNAL_FINISHED_RUN_TTL"] = str(args.finished_run_ttl)
    with (tempfile.TemporaryDirectory() as work,
          ServerProcess(Path(work) / "soak.db", Path(work)) as server):
        server.start()
        run_ids = open_runs(server.grpc_target, args.runs)
        started = time.monotonic()
        until = started + args.seconds
        recorder = Recorder(args.window, started)
        threads = [threading.Thread(target=sender, args=(
            server.grpc_target, run_ids[index::args.senders], f"soak-sender-{index}",
            interval, args.steps_per_batch, until, recorder, churn_interval,
            churn_interval * (index + 1) / args.senders)) for index in range(args.senders)]
        threads.append(threading.Thread(target=reader, args=(
            server.grpc_target, args.read_interval, until, recorder)))
        for thread in threads:
            thread.start()
        print(f"soak: {args.seconds:.0f} s, {args.senders} senders, {args.runs} runs, "
              f"{args.rate:,.0f} samples/s offered in batches of {batch_samples}, "
              f"reads every {args.read_interval} s"
              + (f", {args.churn_per_minute:g} runs replaced a minute (finished-run TTL "
                 f"{args.finished_run_ttl:g} s)" if args.churn_per_minute else ""), flush=True)
        print(f"{'t (s)':>6} {'RSS MiB':>8} {'samples/s':>10} {'report p50/p99 ms':>18} "
              f"{'ListRuns p50/p99':>17} {'ListAlerts p50/p99':>19} "
              f"{'runs on /metrics':>16}", flush=True)
        rss: list[tuple[float, float]] = []
        rows: list[Row] = []
        for index in range(int(args.seconds // args.window)):
            # A window is printed once the next has begun: a call that was still in flight
            # at its end counts where it finished, so wait for those too.
            time.sleep(max(0.0, started + (index + 1) * args.window + SETTLE_SECONDS
                           - time.monotonic()))
            at = (index + 1) * args.window
            rss.append((at, rss_mib(server)))
            shown = runs_on_metrics(server.metrics_url)
            with recorder.lock:
                window = recorder.windows.get(index, Window())
                row = (at, quantiles(window.report), quantiles(window.list_runs),
                       quantiles(window.list_alerts))
                samples = window.samples
            rows.append(row)
            _, report, runs, alerts = row
            print(f"{at:>6.0f} {rss[-1][1]:>8.1f} {samples / args.window:>10,.0f} "
                  f"{report[0]:>8.1f} / {report[1]:>7.1f} {runs[0]:>7.1f} / {runs[1]:>7.1f} "
                  f"{alerts[0]:>8.1f} / {alerts[1]:>7.1f} {shown:>16}", flush=True)
        for thread in threads:
            thread.join()
    return verdict(args, rss, rows, recorder)


def verdict(args: argparse.Namespace, rss: list[tuple[float, float]], rows: list[Row],
            recorder: Recorder) -> int:
    steady = [index for index, (at, *_) in enumerate(rows) if at > args.warmup]
    growth = slope_per_minute([rss[index] for index in steady])
    first, last = rows[steady[0]], rows[steady[-1]]
    print(f"\nverdict over t > {args.warmup:.0f} s ({len(steady)} windows):")
    print(f"  RSS growth: {growth:+.2f} MiB/min (RSS {rss[steady[0]][1]:.1f} -> "
          f"{rss[steady[-1]][1]:.1f} MiB)")
    worst = 0.0
    for position, name in ((1, "ReportBatch"), (2, "ListRuns"), (3, "ListAlerts")):
        p50 = last[position][0] / first[position][0]
        p99 = last[position][1] / first[position][1]
        worst = max(worst, p99)
        print(f"  {name} latency drift, last/first window: p50 x{p50:.2f}, p99 x{p99:.2f}")
    print(f"  failed calls: {recorder.failures or 'none'}; duplicate acks: "
          f"{recorder.duplicates}; runs replaced: {recorder.churned}")
    with recorder.lock:
        delivered = sum(recorder.windows.get(index, Window()).samples for index in steady)
    kept_up = delivered / (len(steady) * args.window) / args.rate
    print(f"  delivered {kept_up:.0%} of the offered rate"
          + ("" if kept_up >= KEPT_UP else ": the server fell behind, so the latencies "
             "measure its backlog; offer less (--rate)"))
    steady_ok = (growth <= args.max_rss_growth and worst <= args.max_drift
                 and kept_up >= KEPT_UP)
    ok = steady_ok and not recorder.failures and not recorder.duplicates
    print(f"  {'STEADY' if ok else 'NOT STEADY'} (limits: {args.max_rss_growth} MiB/min, "
          f"p99 x{args.max_drift})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
