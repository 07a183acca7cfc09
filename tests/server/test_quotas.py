"""Per-token quotas: each refuses with RESOURCE_EXHAUSTED naming itself, and the abuse that
once grew the server without end stays within what the quotas allow, restart included."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from server_support import Client, batch, config, sample

from raresignal.protos.v1 import ingest_pb2
from raresignal.server.process import ServerProcess
from raresignal.server.serving.app import ServerHandle, start_in_thread
from raresignal.server.serving.quotas import Quotas, metadata_bytes
from raresignal.server.serving.validation import MAX_MAP_ENTRIES, metadata_bytes_at_least

TOKENS = {"tok-a": ["a-*"], "tok-b": ["b-*"]}
SMALL = Quotas(max_runs_per_token=3, max_open_runs_per_token=2, max_series_per_token=50,
               max_senders_per_token=3, max_run_metadata_bytes=1000)


@pytest.fixture
def quota_server(tmp_path: Path) -> Iterator[ServerHandle]:
    with start_in_thread(config(tmp_path, tokens=TOKENS, quotas=SMALL)) as handle:
        yield handle


@pytest.fixture
def a(quota_server: ServerHandle) -> Iterator[Client]:
    client = Client(quota_server.grpc_target, token="tok-a")
    yield client
    client.close()


@pytest.fixture
def b(quota_server: ServerHandle) -> Iterator[Client]:
    client = Client(quota_server.grpc_target, token="tok-b")
    yield client
    client.close()


def refused(call: object, *args: object, **kwargs: object) -> str:
    """The details of the RESOURCE_EXHAUSTED that ``call`` must raise."""
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)  # type: ignore[operator]
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
    return raised.value.details()


def names_quota(details: str, quota: str, value: int) -> bool:
    flag = "--" + quota.replace("_", "-")
    return (f"quota {quota} of {value}" in details and flag in details
            and f"RARESIGNAL_{quota.upper()}" in details)


def test_open_runs_per_token(a: Client, b: Client) -> None:
    first = a.open_run("a-1").run_id
    a.open_run("a-2")
    details = refused(a.open_run, "a-3")
    assert names_quota(details, "max_open_runs_per_token", 2), details
    b.open_run("b-1")  # another token's quota is its own
    a.close_run(first)
    a.open_run("a-3")


def test_runs_kept_per_token(a: Client) -> None:
    ids = [a.open_run(f"a-{i}").run_id for i in range(2)]
    for run_id in ids:
        a.close_run(run_id)
    a.open_run("a-2")
    details = refused(a.open_run, "a-3")
    assert names_quota(details, "max_runs_per_token", 3), details
    # Resuming a kept run adds none.
    assert a.open_run("a-0", resume=ids[0]).run_id == ids[0]


def test_series_per_token_across_runs(a: Client, b: Client) -> None:
    one, two = a.open_run("a-1").run_id, a.open_run("a-2").run_id
    a.report([batch(one, 1, [sample("probe_loss", 1, 1.0, probe=f"p{i}") for i in range(30)])])
    a.report([batch(two, 1, [sample("probe_loss", 1, 1.0, probe=f"p{i}") for i in range(20)])])
    details = refused(a.report, [batch(two, 2, [sample("probe_loss", 2, 1.0, probe="new")])])
    assert names_quota(details, "max_series_per_token", 50), details
    assert "this token's runs hold 50" in details
    # Series that exist still take values, and the other token has its own quota.
    assert a.report([batch(two, 2, [sample("probe_loss", 2, 2.0, probe="p3")])])[0].outcome \
        == ingest_pb2.ReportAck.OUTCOME_APPLIED
    other = b.open_run("b-1").run_id
    b.report([batch(other, 1, [sample("probe_loss", 1, 1.0, probe=f"p{i}") for i in range(50)])])


def test_senders_per_token_across_runs(a: Client) -> None:
    one, two = a.open_run("a-1").run_id, a.open_run("a-2").run_id
    a.report([batch(one, 1, [sample("loss", 1, 1.0)], sender=f"rank{i}") for i in range(2)])
    a.report([batch(two, 1, [sample("loss", 1, 1.0)], sender="rank0")])
    details = refused(a.report, [batch(two, 1, [sample("loss", 1, 1.0)], sender="rank1")])
    assert names_quota(details, "max_senders_per_token", 3), details
    # Known senders go on.
    assert a.report([batch(one, 2, [sample("loss", 2, 1.0)], sender="rank1")])[0].outcome \
        == ingest_pb2.ReportAck.OUTCOME_APPLIED


def test_run_metadata_bytes(a: Client) -> None:
    request = ingest_pb2.OpenRunRequest(run_name="a-big", world_size=1,
                                        config={"lr": "x" * 600}, tags={"team": "y" * 600})
    details = refused(a.ingest.OpenRun, request, metadata=a.metadata, timeout=10)
    assert names_quota(details, "max_run_metadata_bytes", 1000), details
    # Refused on arrival, by the decoder's sizes, before the ledger copies a string.
    assert "take at least 1186 bytes" in details
    request.tags["team"] = "y" * 300
    a.ingest.OpenRun(request, metadata=a.metadata, timeout=10)


def test_run_metadata_bytes_of_many_small_entries(a: Client) -> None:
    # Framing makes the lower bound fit; the ledger's exact count refuses.
    request = ingest_pb2.OpenRunRequest(
        run_name="a-many", world_size=1, config={f"{i:03d}": "v" * 8 for i in range(100)})
    details = refused(a.ingest.OpenRun, request, metadata=a.metadata, timeout=10)
    assert names_quota(details, "max_run_metadata_bytes", 1000), details
    assert "take 1100 bytes" in details


def test_too_many_entries_are_refused_on_arrival(a: Client) -> None:
    request = ingest_pb2.OpenRunRequest(
        run_name="a-wide", world_size=1, tags={str(i): "" for i in range(MAX_MAP_ENTRIES + 1)})
    with pytest.raises(grpc.RpcError) as raised:
        a.ingest.OpenRun(request, metadata=a.metadata, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"tags has {MAX_MAP_ENTRIES + 1} entries" in raised.value.details()


_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)


@given(config=st.dictionaries(_TEXT, _TEXT, max_size=20),
       tags=st.dictionaries(_TEXT, _TEXT, max_size=20),
       run_name=_TEXT, agent_version=_TEXT, resume_run_id=_TEXT,
       world_size=st.integers(-2**31, 2**31 - 1), interval=st.floats())
def test_the_lower_bound_never_exceeds_the_exact_metadata_size(
        config: dict[str, str], tags: dict[str, str], run_name: str, agent_version: str,
        resume_run_id: str, world_size: int, interval: float) -> None:
    request = ingest_pb2.OpenRunRequest(
        run_name=run_name, resume_run_id=resume_run_id, config=config, tags=tags,
        world_size=world_size, report_interval_seconds=interval, agent_version=agent_version)
    exact = metadata_bytes(config, tags)
    assert metadata_bytes_at_least(request) <= exact
    # Close enough to refuse on arrival what is far over the quota.
    assert metadata_bytes_at_least(request) >= exact - 18 * (len(config) + len(tags))


def test_without_tokens_all_callers_share_one_quota(tmp_path: Path) -> None:
    with start_in_thread(config(tmp_path, quotas=SMALL)) as handle:
        first, second = Client(handle.grpc_target), Client(handle.grpc_target)
        first.open_run("team-a")
        second.open_run("team-b")
        details = refused(first.open_run, "team-c")
        assert names_quota(details, "max_open_runs_per_token", 2), details
        first.close()
        second.close()


# -- the abuse, at a reduced scale ------------------------------------------------------
#
# One token opens run after run, each asking for 256 config entries of 4 KiB and 2000
# series. The quotas below bound what it can make the server keep; the bounds asserted
# are derived from them with a generous cost per item, far below what the same traffic
# held without quotas.
RUNS, OPEN_RUNS, SERIES, METADATA = 10, 4, 4000, 16 * 1024
ATTEMPTS, SERIES_ASKED, BATCH = 30, 2000, 1000
BYTES_PER_SERIES = 8 * 1024  # live value, engine state, storage's id cache, with slack
BYTES_PER_RUN = 4 * METADATA  # its record, config and tags as Python objects
RSS_GROWTH_BOUND = 40 * 2**20 + SERIES * BYTES_PER_SERIES + RUNS * BYTES_PER_RUN
# Each series is exposed as three lines (its value, and the step and time it was measured),
# each with its run and label values.
METRICS_BYTES_PER_SERIES = 3 * 200
METRICS_BOUND = 64 * 1024 + SERIES * METRICS_BYTES_PER_SERIES


def rss_bytes(process: ServerProcess) -> int:
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def metrics_size(url: str) -> int:
    return len(urllib.request.urlopen(url, timeout=30).read())


def quota_of(error: grpc.RpcError) -> str:
    """The quota a RESOURCE_EXHAUSTED names."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    return error.details().split("beyond the quota ")[1].split()[0]


def abuse(client: Client) -> dict[str, int]:
    """Opens and fills runs past every quota, as a client that retries would; counts
    what was refused, by quota."""
    refusals: dict[str, int] = {}
    open_ids: list[str] = []

    def count(error: grpc.RpcError) -> None:
        quota = quota_of(error)
        refusals[quota] = refusals.get(quota, 0) + 1

    for attempt in range(ATTEMPTS):
        request = ingest_pb2.OpenRunRequest(
            run_name=f"abuse-{attempt}", world_size=1,
            config={f"k{i}": "v" * 4096 for i in range(256)})
        try:
            client.ingest.OpenRun(request, metadata=client.metadata, timeout=30)
        except grpc.RpcError as error:
            count(error)
        request.config.clear()
        request.config.update({f"k{i}": "v" * 400 for i in range(32)})
        try:
            run_id = client.ingest.OpenRun(request, metadata=client.metadata,
                                           timeout=30).run_id
        except grpc.RpcError as error:
            count(error)
            if open_ids and quota_of(error) == "max_open_runs_per_token":
                client.close_run(open_ids.pop(0))
            continue
        for sequence, start in enumerate(range(0, SERIES_ASKED, BATCH), 1):
            samples = [sample("probe_loss", 1, 1.0, probe=f"probe-{attempt}-{i}")
                       for i in range(start, start + BATCH)]
            try:
                client.report([batch(run_id, sequence, samples)])
            except grpc.RpcError as error:
                count(error)
        if attempt % 2:
            client.close_run(run_id)
        else:  # half the runs are left open
            open_ids.append(run_id)
    return refusals


def test_abuse_stays_within_what_the_quotas_allow(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("TOKENS", "tok=abuse-*"), ("MAX_RUNS_PER_TOKEN", RUNS),
                        ("MAX_OPEN_RUNS_PER_TOKEN", OPEN_RUNS),
                        ("MAX_SERIES_PER_TOKEN", SERIES), ("MAX_RUN_METADATA_BYTES", METADATA)):
        monkeypatch.setenv(f"RARESIGNAL_{name}", str(value))
    with ServerProcess(tmp_path / "abuse.db", tmp_path) as server:
        server.start()
        client = Client(server.grpc_target, token="tok")
        baseline = rss_bytes(server)
        refusals = abuse(client)
        client.close()
        assert set(refusals) == {"max_runs_per_token", "max_open_runs_per_token",
                                 "max_series_per_token", "max_run_metadata_bytes"}, refusals
        size = metrics_size(server.metrics_url)
        grown = rss_bytes(server) - baseline
        print(f"rss baseline {baseline / 2**20:.1f} MiB, growth {grown / 2**20:.1f} MiB "
              f"(bound {RSS_GROWTH_BOUND / 2**20:.1f}), /metrics {size / 1024:.0f} KiB "
              f"(bound {METRICS_BOUND / 1024:.0f}), refusals {refusals}")
        assert size < METRICS_BOUND
        assert grown < RSS_GROWTH_BOUND
        server.stop()
        server.start()
        restarted = rss_bytes(server) - baseline
        print(f"after a restart: growth {restarted / 2**20:.1f} MiB")
        assert restarted < RSS_GROWTH_BOUND
        # The counts are the runs themselves, so a restart keeps every quota in force.
        client = Client(server.grpc_target, token="tok")
        details = refused(client.open_run, "abuse-after-restart")
        client.close()
        assert "max_runs_per_token" in details, details


def test_quotas_come_from_flags_and_variables() -> None:
    from raresignal.server.cli import _server_config, build_parser, server_settings

    args = build_parser().parse_args(["server", "--max-series-per-token", "7"])
    environ = {"RARESIGNAL_MAX_OPEN_RUNS_PER_TOKEN": "3",
               "RARESIGNAL_ALERTS_KEPT_PER_RUN": "5"}
    settings = server_settings(args, environ)
    server_config = _server_config(settings, environ)
    assert server_config.quotas == Quotas(max_series_per_token=7, max_open_runs_per_token=3)
    assert server_config.retention.alerts_per_run == 5


def test_the_readme_states_the_defaults() -> None:
    import re

    from raresignal.server.serving.app import ServerConfig

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    stated = dict(re.findall(r"`--([a-z-]+)`[^(`]*\((\d{1,3}(?:,\d{3})*(?: KiB)?)", readme))
    defaults = ServerConfig()
    expected = {name.replace("_", "-"): f"{value:,}" for name, value in vars(Quotas()).items()}
    expected["max-run-metadata-bytes"] = f"{Quotas().max_run_metadata_bytes // 1024} KiB"
    expected["alerts-kept-per-run"] = f"{defaults.retention.alerts_per_run:,}"
    assert {flag: stated.get(flag) for flag in expected} == expected
