"""List latency: every list RPC against a server that holds 100,000 alerts.

The alerts, their transitions and the runs are written straight into a SQLite file with
the storage API before the server starts (driving rules to fire 100,000 times would take
hours and measure ingest, not lists): ``--runs`` finished runs shared among ``--teams``
teams (run names ``team<t>-run-<i>``, one token per team scoped to ``team<t>-*``, and an
admin token for ``*``), ``--alerts`` alerts spread over them, each with the transitions
that led to its state (unspecified -> pending -> firing -> resolved), most resolved, about
1% firing and 1% pending, under a handful of rules, started over the last 30 days. The
server (``raresignal server`` in its own process) then opens one run of its own through
``OpenRun`` and receives ``--series`` series and one long series of ``--long-steps``
steps through ``Report``.

Then it times, from a client in this process over loopback, each list RPC ``--repeats``
times (after one untimed call, which warms the statement cache) and every page of the
full listings:

* ``ListRuns`` (first page of 100; every page of 100 and of 1000),
* ``ListAlerts`` unscoped (admin), scoped to one team, filtered by run, by rule, by state
  (firing), scoped and filtered by state, and every page of the admin's 100,000 with
  ``page_size`` 100 and the largest the server serves,
* ``GetSeries`` (first page of 1000; every largest page of the long series) and
  ``ListSeries`` (first page of 100; every page of 1000).

For each it prints the calls made, p50 and p99 in milliseconds, and a verdict against
``--target-ms`` (p99 under it). It exits 1 when any RPC misses the target.

    python benchmarks/list_latency.py                         # 100k alerts, 400 runs
    python benchmarks/list_latency.py --alerts 20000 --repeats 10        # a quick look
    python benchmarks/list_latency.py --teams 20 --runs 2000            # many small teams
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
from google.protobuf.message import Message

from raresignal.client.channels import auth_metadata
from raresignal.protos.transport import client_channel_options
from raresignal.protos.v1 import (
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
)
from raresignal.server.process import ServerProcess
from raresignal.server.serving.validation import MAX_ALERTS_PAGE_SIZE, MAX_SAMPLES_PAGE_SIZE
from raresignal.server.storage.records import AlertChange, AlertRecord, EngineWrites, RunRecord
from raresignal.server.storage.sqlite import SQLiteStorage

ADMIN_TOKEN = "admin-token"
RULES = ("RareProbeLossRise", "SharpnessSpike", "GradNormExplosion", "LossDivergence",
         "RunStalled", "UpdateRatioDrift")
UNSPECIFIED, PENDING, FIRING, RESOLVED = (
    common_pb2.ALERT_STATE_UNSPECIFIED, common_pb2.ALERT_STATE_PENDING,
    common_pb2.ALERT_STATE_FIRING, common_pb2.ALERT_STATE_RESOLVED)
DAY_SECONDS = 86_400.0
CALL_TIMEOUT_SECONDS = 120.0
SAMPLES_PER_BATCH = 5_000


def team_token(team: int) -> str:
    return f"team{team}-token"


def _transitions(alert: AlertRecord) -> list[AlertChange]:
    """The changes that led to ``alert``'s state, one per step of its life."""
    pending = replace(alert, state=PENDING, fired_at=0.0, resolved_at=0.0)
    changes = [AlertChange(pending, UNSPECIFIED, alert.started_at)]
    if alert.state in (FIRING, RESOLVED):
        firing = replace(alert, state=FIRING, resolved_at=0.0)
        changes.append(AlertChange(firing, PENDING, alert.fired_at))
    if alert.state == RESOLVED:
        changes.append(AlertChange(alert, FIRING, alert.resolved_at))
    return changes


def populate(path: Path, alerts: int, runs: int, teams: int, now: float, seed: int) -> None:
    """Writes ``runs`` finished runs and ``alerts`` alerts (with their transitions)."""
    rng = random.Random(seed)
    store = SQLiteStorage(str(path))
    try:
        per_run = [alerts // runs + (1 if index < alerts % runs else 0)
                   for index in range(runs)]
        for index, count in enumerate(per_run):
            created = now - 30 * DAY_SECONDS + index * (29 * DAY_SECONDS / runs)
            run = RunRecord(run_id=f"{index + 1:016x}",
                            run_name=f"team{index % teams}-run-{index}",
                            state=common_pb2.RUN_STATE_COMPLETED, world_size=8,
                            created_at=created, updated_at=created + DAY_SECONDS / 2,
                            last_step=100_000, report_interval_seconds=10.0,
                            config={"lr": "3e-4", "model": "demo"}, tags={"team": str(index)},
                            agent_version="bench", finished_at=created + DAY_SECONDS / 2)
            records: list[AlertRecord] = []
            for number in range(count):
                roll = rng.random()
                state = PENDING if roll < 0.01 else FIRING if roll < 0.02 else RESOLVED
                started = created + rng.uniform(0, DAY_SECONDS / 2)
                rule = rng.choice(RULES)
                records.append(AlertRecord(
                    alert_id=f"{index + 1:08x}{number:08x}", run_id=run.run_id,
                    run_name=run.run_name, rule=rule, labels={"probe": f"p{number % 7}"},
                    state=state, severity="warning", summary=f"{rule} on probe",
                    value=rng.random(), threshold=0.5, step=number * 10, started_at=started,
                    fired_at=0.0 if state == PENDING else started + 60,
                    resolved_at=started + 600 if state == RESOLVED else 0.0))
            store.create_run(run)
            store.update_run(run, EngineWrites(
                alerts=records,
                changes=[change for alert in records for change in _transitions(alert)]))
    finally:
        store.close()


def report_long_run(target: str, token: str, series: int, long_steps: int) -> str:
    """Opens a run through the server and reports ``series`` probe series (one step
    each) and one ``loss`` series of ``long_steps`` steps; the run's id."""
    metadata = auth_metadata(token)
    with grpc.insecure_channel(target, client_channel_options()) as channel:
        ingest = ingest_pb2_grpc.IngestStub(channel)
        run_id = ingest.OpenRun(ingest_pb2.OpenRunRequest(run_name="team0-run-long",
                                                          world_size=1),
                                metadata=metadata, timeout=CALL_TIMEOUT_SECONDS).run_id
        samples = [common_pb2.Sample(metric="probe_loss", labels={"probe": f"p{i}"}, step=0,
                                     value=1.0, wall_time=time.time()) for i in range(series)]
        samples += [common_pb2.Sample(metric="loss", step=step, value=1.0 / (1 + step),
                                      wall_time=time.time()) for step in range(long_steps)]
        batches = [ingest_pb2.ReportBatch(run_id=run_id, sender_id="rank0", sequence=number,
                                          samples=samples[start:start + SAMPLES_PER_BATCH])
                   for number, start in enumerate(range(0, len(samples), SAMPLES_PER_BATCH), 1)]
        for ack in ingest.Report(iter(batches), metadata=metadata,
                                 timeout=CALL_TIMEOUT_SECONDS):
            if ack.outcome != ingest_pb2.ReportAck.OUTCOME_APPLIED:
                raise RuntimeError(f"batch {ack.sequence} was not applied: {ack}")
    return run_id


def timed(call: Callable[[], Message]) -> tuple[float, Message]:
    started = time.perf_counter()
    response = call()
    return time.perf_counter() - started, response


def repeat(call: Callable[[], Message], times: int) -> list[float]:
    """``times`` latencies of one call, after an untimed one."""
    call()
    return [timed(call)[0] for _ in range(times)]


def every_page(call: Callable[[str], Message]) -> tuple[list[float], int]:
    """The latency of each page of a full listing, and the items listed."""
    latencies: list[float] = []
    items = 0
    token = ""
    while True:
        latency, page = timed(lambda token=token: call(token))
        latencies.append(latency)
        items += sum(len(getattr(page, name)) for name in ("runs", "alerts", "samples",
                                                            "series") if hasattr(page, name))
        token = page.next_page_token  # type: ignore[attr-defined]
        if not token:
            return latencies, items


def quantiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(values)
    return (statistics.median(ordered) * 1e3,
            ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3)


def measurements(target: str, run_id: str, long_run: str, teams: int, repeats: int
                 ) -> Iterator[tuple[str, list[float], str]]:
    """(RPC and what it asked, latencies, note) for every list RPC timed."""
    channel = grpc.insecure_channel(target, client_channel_options())
    runs = alerts_pb2_grpc.RunsStub(channel)
    alerts = alerts_pb2_grpc.AlertsStub(channel)
    admin = auth_metadata(ADMIN_TOKEN)
    team = auth_metadata(team_token(teams - 1))
    options = {"metadata": admin, "timeout": CALL_TIMEOUT_SECONDS}

    def list_alerts(metadata: object = admin, **fields: object) -> Message:
        return alerts.ListAlerts(alerts_pb2.ListAlertsRequest(**fields),  # type: ignore[arg-type]
                                 metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)

    try:
        yield "ListRuns first page of 100", repeat(lambda: runs.ListRuns(
            alerts_pb2.ListRunsRequest(include_finished=True, page_size=100), **options),
            repeats), ""
        for size in (100, 1000):
            latencies, items = every_page(lambda token, size=size: runs.ListRuns(
                alerts_pb2.ListRunsRequest(include_finished=True, page_size=size,
                                           page_token=token), **options))
            yield f"ListRuns every page of {size}", latencies, f"{items:,} runs"
        yield "ListAlerts admin, first page of 100", repeat(
            lambda: list_alerts(page_size=100), repeats), ""
        yield "ListAlerts one team, first page of 100", repeat(
            lambda: list_alerts(team, page_size=100), repeats), ""
        yield "ListAlerts one team, firing", repeat(
            lambda: list_alerts(team, page_size=100,
                                filter=alerts_pb2.AlertFilter(states=[FIRING])), repeats), ""
        yield "ListAlerts by run", repeat(lambda: list_alerts(
            page_size=100, filter=alerts_pb2.AlertFilter(run_id=run_id)), repeats), ""
        yield "ListAlerts by rule", repeat(lambda: list_alerts(
            page_size=100, filter=alerts_pb2.AlertFilter(rule=RULES[0])), repeats), ""
        yield "ListAlerts by state (firing)", repeat(lambda: list_alerts(
            page_size=100, filter=alerts_pb2.AlertFilter(states=[FIRING])), repeats), ""
        yield "ListAlerts by state (pending+firing)", repeat(lambda: list_alerts(
            page_size=100, filter=alerts_pb2.AlertFilter(states=[PENDING, FIRING])),
            repeats), ""
        for size in (100, MAX_ALERTS_PAGE_SIZE):
            latencies, items = every_page(lambda token, size=size: list_alerts(
                page_size=size, page_token=token))
            yield f"ListAlerts admin, every page of {size}", latencies, f"{items:,} alerts"
        latencies, items = every_page(lambda token: list_alerts(
            team, page_size=MAX_ALERTS_PAGE_SIZE, page_token=token))
        yield (f"ListAlerts one team, every page of {MAX_ALERTS_PAGE_SIZE}", latencies,
               f"{items:,} alerts")
        series_request = {"run_id": long_run, "metric": "loss"}
        yield "GetSeries first page of 1000", repeat(lambda: runs.GetSeries(
            alerts_pb2.GetSeriesRequest(page_size=1000, **series_request), **options),
            repeats), ""
        latencies, items = every_page(lambda token: runs.GetSeries(
            alerts_pb2.GetSeriesRequest(page_size=MAX_SAMPLES_PAGE_SIZE, page_token=token,
                                        **series_request), **options))
        yield (f"GetSeries every page of {MAX_SAMPLES_PAGE_SIZE}", latencies,
               f"{items:,} samples")
        yield "ListSeries first page of 100", repeat(lambda: runs.ListSeries(
            alerts_pb2.ListSeriesRequest(run_id=long_run, page_size=100), **options),
            repeats), ""
        latencies, items = every_page(lambda token: runs.ListSeries(
            alerts_pb2.ListSeriesRequest(run_id=long_run, page_size=1000, page_token=token),
            **options))
        yield "ListSeries every page of 1000", latencies, f"{items:,} series"
    finally:
        channel.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--alerts", type=int, default=100_000,
                        help="alerts stored before the server starts (default %(default)s)")
    parser.add_argument("--runs", type=int, default=400,
                        help="finished runs the alerts are spread over (default %(default)s)")
    parser.add_argument("--teams", type=int, default=4,
                        help="teams the runs are shared among, one token each "
                             "(default %(default)s)")
    parser.add_argument("--series", type=int, default=2_000,
                        help="series of the run the server receives (default %(default)s)")
    parser.add_argument("--long-steps", type=int, default=20_000,
                        help="steps of its long series (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=50,
                        help="timed calls per RPC that is not a full listing "
                             "(default %(default)s)")
    parser.add_argument("--target-ms", type=float, default=100.0,
                        help="the p99 each RPC must stay under (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs < args.teams or args.teams < 1 or args.alerts < args.runs:
        parser.error("need at least one team, a run per team and an alert per run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokens = [f"{ADMIN_TOKEN}=*"] + [f"{team_token(t)}=team{t}-*" for t in range(args.teams)]
    os.environ["RARESIGNAL_TOKENS"] = ",".join(tokens)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "lists.db"
        started = time.perf_counter()
        populate(path, args.alerts, args.runs, args.teams, time.time(), args.seed)
        print(f"stored {args.alerts:,} alerts of {args.runs} runs ({args.teams} teams) in "
              f"{time.perf_counter() - started:.1f} s; database "
              f"{path.stat().st_size / 2**20:.0f} MiB", flush=True)
        with ServerProcess(path, Path(work)) as server:
            server.start()
            long_run = report_long_run(server.grpc_target, team_token(0), args.series,
                                       args.long_steps)
            print(f"{'RPC':<42} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8}  verdict", flush=True)
            missed = []
            for name, latencies, note in measurements(
                    server.grpc_target, f"{args.runs:016x}", long_run, args.teams,
                    args.repeats):
                p50, p99 = quantiles(latencies)
                ok = p99 < args.target_ms
                if not ok:
                    missed.append(name)
                print(f"{name:<42} {len(latencies):>6} {p50:>8.1f} {p99:>8.1f}  "
                      f"{'ok' if ok else 'MISSED'}{f' ({note})' if note else ''}", flush=True)
    print(f"\n{'every list RPC under' if not missed else 'MISSED'} {args.target_ms:g} ms "
          f"at p99{': ' + ', '.join(missed) if missed else ''}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
