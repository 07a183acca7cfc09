"""Malformed and hostile input: a precise status for each, nothing of a rejected batch
stored, and the server keeps serving."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import Client, batch, config, sample

from raresignal.protos.catalog import CATALOG
from raresignal.protos.transport import REJECTED_SEQUENCE_METADATA_KEY
from raresignal.protos.v1 import alerts_pb2, common_pb2, ingest_pb2
from raresignal.server.serving.app import ServerHandle, start_in_thread

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
APPLIED = ingest_pb2.ReportAck.OUTCOME_APPLIED
DUPLICATE = ingest_pb2.ReportAck.OUTCOME_DUPLICATE


class Harness:
    def __init__(self, handle: ServerHandle, db: Path) -> None:
        self.handle, self.db = handle, db
        self.client = Client(handle.grpc_target)
        self.run_id = self.client.open_run("fuzz").run_id
        self.applied: dict[str, int] = {}  # sender -> highest sequence applied

    def rows(self) -> tuple[int, ...]:
        with sqlite3.connect(self.db) as conn:
            return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                         for t in ("samples", "series", "sender_sequences", "alerts",
                                   "rule_states"))

    def send(self, message: ingest_pb2.ReportBatch) -> tuple[grpc.StatusCode, object]:
        try:
            (ack,) = self.client.report([message])
            return OK, ack
        except grpc.RpcError as error:
            return error.code(), error


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with start_in_thread(config(tmp)) as handle:
        h = Harness(handle, tmp / "raresignal.db")
        yield h
        h.client.close()


names = st.one_of(st.sampled_from(sorted(CATALOG)), st.text(max_size=140))
label_keys = st.one_of(st.sampled_from(["probe", "group", "layer", "estimator"]),
                       st.text(max_size=10))
label_values = st.one_of(st.text(min_size=1, max_size=8), st.text(max_size=200))
steps = st.one_of(st.integers(0, 1000), st.integers(-(2**63), 2**63 - 1))
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e6, 1e6))
hostile_samples = st.builds(
    lambda metric, labels, step, value, wall: common_pb2.Sample(
        metric=metric, labels=labels, step=step, value=value, wall_time=wall),
    names, st.dictionaries(label_keys, label_values, max_size=2), steps, values,
    st.one_of(st.just(1.7e9), st.floats(allow_nan=True)))


def _valid_sample(metric: str) -> st.SearchStrategy[common_pb2.Sample]:
    keys = CATALOG[metric].labels
    labels = (st.dictionaries(st.sampled_from(keys), st.text(min_size=1, max_size=8),
                              max_size=1) if keys else st.just({}))
    return st.builds(
        lambda labels, step, value: common_pb2.Sample(
            metric=metric, labels=labels, step=step, value=value, wall_time=1.7e9),
        labels, st.integers(0, 1000), st.floats(-1e6, 1e6))


valid_samples = st.sampled_from(sorted(CATALOG)).flatmap(_valid_sample)
# Mostly valid batches with the odd hostile sample, so every rule is reached often.
samples = st.one_of(valid_samples, valid_samples, valid_samples, hostile_samples)


def _set(field: str, value: object) -> Callable[[common_pb2.Sample], None]:
    def corrupt(sample: common_pb2.Sample) -> None:
        setattr(sample, field, value)
    return corrupt


def _label(key: str, value: str) -> Callable[[common_pb2.Sample], None]:
    def corrupt(sample: common_pb2.Sample) -> None:
        sample.labels[key] = value
    return corrupt


# One targeted fault in an otherwise valid batch: each validation rule, one at a time.
CORRUPTIONS = [
    _set("metric", "not_a_metric"), _set("metric", "x" * 200), _set("step", -1),
    _set("step", 10**12 + 1), _set("value", math.nan), _set("value", -math.inf),
    _set("wall_time", math.nan), _set("wall_time", -1.0), _label("colour", "red"),
    _label("probe", ""), _label("probe", "p" * 129), _label("probe", "a\nb"),
    _label("probe", "caf\u00e9"),
]


def expected_code(h: Harness, message: ingest_pb2.ReportBatch) -> grpc.StatusCode:
    """An independent statement of the validation rules, in the order the server applies
    them: envelope, run, duplicate, then each sample."""
    run_id = message.run_id
    if len(run_id) != 16 or any(c not in "0123456789abcdef" for c in run_id):
        return INVALID
    sender = message.sender_id
    if not (1 <= len(sender) <= 128) or any(
            not (c.isascii() and (c.isalnum() or c in "_.:/-")) for c in sender):
        return INVALID
    if not 1 <= message.sequence < 2**63:
        return INVALID
    if message.run_id != h.run_id:
        return grpc.StatusCode.NOT_FOUND
    if message.sequence <= h.applied.get(sender, 0):
        return OK  # a duplicate, acknowledged
    for s in message.samples:
        spec = CATALOG.get(s.metric)
        if spec is None or not 0 <= s.step <= 10**12 or not math.isfinite(s.value):
            return INVALID
        if not math.isfinite(s.wall_time) or s.wall_time < 0:
            return INVALID
        if any(k not in spec.labels or not 1 <= len(v) <= 128
               or any(not " " <= c <= "~" for c in v) for k, v in s.labels.items()):
            return INVALID
    return OK


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    run_choice=st.sampled_from(["valid"] * 5 + ["unknown", "malformed", "empty", "long"]),
    sender=st.one_of(st.just("rank0-fuzz"), st.just("rank1-fuzz"), st.text(max_size=140)),
    sequence_choice=st.sampled_from(["next", "zero", "replay", "huge"]),
    batch_samples=st.lists(samples, max_size=6),
    corruption=st.one_of(st.none(), st.sampled_from(CORRUPTIONS)),
    position=st.integers(0, 5),
)
def test_hostile_batches_get_the_right_status_and_store_nothing(
        harness: Harness, run_choice: str, sender: str, sequence_choice: str,
        batch_samples: list[common_pb2.Sample],
        corruption: Callable[[common_pb2.Sample], None] | None, position: int) -> None:
    h = harness
    if corruption is not None and batch_samples:
        corruption(batch_samples[position % len(batch_samples)])
    run_id = {"valid": h.run_id, "unknown": "0123456789abcdef", "malformed": "no-such-run",
              "empty": "", "long": "a" * 129}[run_choice]
    last = h.applied.get(sender, 0)
    sequence = {"next": last + 1, "zero": 0, "replay": max(1, last),
                "huge": 2**63}[sequence_choice]
    message = ingest_pb2.ReportBatch(run_id=run_id, sender_id=sender, sequence=sequence,
                                     samples=batch_samples)
    expected = expected_code(h, message)
    before = h.rows()
    code, result = h.send(message)
    assert code == expected, getattr(result, "details", lambda: "")()
    if code != OK:
        assert h.rows() == before
        trailing = dict(result.trailing_metadata() or ())  # type: ignore[union-attr]
        assert trailing.get(REJECTED_SEQUENCE_METADATA_KEY) == str(sequence)
        assert result.details()  # type: ignore[union-attr]
    elif sequence <= last:
        assert result.outcome == DUPLICATE and h.rows() == before  # type: ignore[union-attr]
    else:
        assert result.outcome == APPLIED  # type: ignore[union-attr]
        h.applied[sender] = sequence
    # The server still takes a good batch.
    good_sequence = h.applied.get("rank0-fuzz", 0) + 1
    good = batch(h.run_id, good_sequence, [sample("loss", 1, 0.5)], sender="rank0-fuzz")
    assert h.send(good)[0] == OK
    h.applied["rank0-fuzz"] = good_sequence


@pytest.fixture
def c(server: ServerHandle) -> Iterator[Client]:
    client = Client(server.grpc_target)
    yield client
    client.close()


def reject(client: Client, message: ingest_pb2.ReportBatch) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        client.report([message])
    return raised.value


def test_status_codes_name_the_field(c: Client) -> None:
    run_id = c.open_run("codes").run_id
    cases = [
        (batch("0123456789abcdef", 1, []), grpc.StatusCode.NOT_FOUND,
         "run_id '0123456789abcdef' is not a known run"),
        (batch("nope", 1, []), INVALID, "run_id 'nope' is not a run id (16 characters"),
        (batch(run_id.upper(), 1, []), INVALID, "is not a run id"),
        (batch(run_id, 2**63, []), INVALID, "sequence 9223372036854775808 is above"),
        (batch(run_id, 2**64 - 1, []), INVALID, "above the largest allowed"),
        (batch(run_id, 0, []), INVALID, "sequence must be >= 1"),
        (batch(run_id, 1, [], sender="bad sender"), INVALID, "sender_id"),
        (batch(run_id, 1, [sample("loss", 1, math.nan)]), INVALID,
         "samples[0].value of metric 'loss' at step 1 is not finite"),
        (batch(run_id, 1, [sample("loss", 1, 1.0), sample("loss", -1, 1.0)]), INVALID,
         "samples[1].step -1"),
        (batch(run_id, 1, [sample("loss", 10**12 + 1, 1.0)]), INVALID, "outside 0.."),
        (batch(run_id, 1, [sample("los", 1, 1.0)]), INVALID,
         "samples[0].metric 'los' is not in the raresignal catalogue"),
        (batch(run_id, 1, [sample("loss", 1, 1.0, probe="x")]), INVALID,
         "samples[0].labels key 'probe' is not allowed on metric 'loss'"),
        (batch(run_id, 1, [sample("probe_loss", 1, 1.0, probe="x" * 129)]), INVALID,
         "samples[0].labels['probe'] must have 1..128 characters"),
        (batch(run_id, 1, [sample("probe_loss", 1, 1.0, probe="x\ny")]), INVALID,
         "samples[0].labels['probe'] may only use printable ASCII characters"),
        (batch(run_id, 1, [sample("loss", i, 1.0) for i in range(10_001)]),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "more than 10000 per batch"),
    ]
    for message, code, text in cases:
        error = reject(c, message)
        assert (error.code(), text in error.details()) == (code, True), error.details()
    assert c.series(run_id, "loss") == []
    assert c.report([batch(run_id, 1, [sample("loss", 1, 1.0)])])[0].outcome == APPLIED


def test_too_many_series_per_run_is_refused(c: Client) -> None:
    run_id = c.open_run("wide").run_id
    c.report([batch(run_id, 1, [sample("probe_loss", 1, 1.0, probe=f"p{i}")
                                for i in range(10_000)])])
    error = reject(c, batch(run_id, 2, [sample("probe_loss", 2, 1.0, probe="one-more")]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "10000 series per run" in error.details()
    # Existing series still take values.
    assert c.report([batch(run_id, 2, [sample("probe_loss", 2, 2.0, probe="p7")])])[0].outcome \
        == APPLIED


def test_closed_runs_refuse_new_batches_but_acknowledge_replays(c: Client) -> None:
    run_id = c.open_run("closed").run_id
    c.report([batch(run_id, 1, [sample("loss", 1, 1.0)])])
    c.close_run(run_id)
    assert c.report([batch(run_id, 1, [sample("loss", 1, 1.0)])])[0].outcome == DUPLICATE
    error = reject(c, batch(run_id, 2, [sample("loss", 2, 1.0)]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is closed (RUN_STATE_COMPLETED)" in error.details()
    resumed = c.open_run("closed", resume=run_id)
    assert resumed.run.state == common_pb2.RUN_STATE_ACTIVE
    assert c.report([batch(run_id, 2, [sample("loss", 2, 1.0)])])[0].outcome == APPLIED


def test_bad_open_close_and_query_requests(c: Client) -> None:
    for name, text in (("", "run_name is empty"), ("a b", "may only use characters"),
                       ("x" * 129, "more than 128")):
        with pytest.raises(grpc.RpcError) as raised:
            c.open_run(name)
        assert raised.value.code() == INVALID and text in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        c.open_run("ok", world_size=0)
    assert "world_size" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        c.open_run("ok", resume="0123456789abcdef")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    run_id = c.open_run("ok").run_id
    with pytest.raises(grpc.RpcError) as raised:
        c.open_run("other-name", resume=run_id)
    assert raised.value.code() == INVALID and "belongs to run 'ok'" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        c.close_run(run_id, common_pb2.RUN_STATE_ACTIVE)
    assert raised.value.code() == INVALID and "state must be" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        c.series(run_id, "no_such_metric")
    assert raised.value.code() == INVALID
    with pytest.raises(grpc.RpcError) as raised:
        c.alerts.ListAlerts(alerts_pb2.ListAlertsRequest(limit=-1), timeout=10)
    assert raised.value.code() == INVALID


def test_oversized_messages_are_refused_by_the_transport(c: Client) -> None:
    run_id = c.open_run("huge").run_id
    big = batch(run_id, 1, [sample("probe_loss", 1, 1.0, probe="p" * 120)] * 9_000)
    big.samples[0].metric = "m" * (5 * 1024 * 1024)  # past the 4 MiB message bound
    error = reject(c, big)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c.report([batch(run_id, 1, [sample("loss", 1, 1.0)])])[0].outcome == APPLIED


def test_identifiers_outside_their_charset_are_invalid_on_every_call(c: Client) -> None:
    run_id = c.open_run("charset").run_id

    def code_and_details(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        return raised.value.code(), raised.value.details()

    forged = "x\nINFO raresignal.server: forged"
    open_requests = [
        (ingest_pb2.OpenRunRequest(run_name=forged, world_size=1), "run_name"),
        (ingest_pb2.OpenRunRequest(run_name="ok", world_size=1, resume_run_id=forged),
         "resume_run_id"),
        (ingest_pb2.OpenRunRequest(run_name="ok", world_size=1, agent_version=forged),
         "agent_version"),
        (ingest_pb2.OpenRunRequest(run_name="ok", world_size=1, tags={forged: "v"}),
         "tags key"),
    ]
    for request, field in open_requests:
        code, details = code_and_details(
            lambda r=request: c.ingest.OpenRun(r, timeout=10))  # type: ignore[misc]
        assert (code, field in details, "\n" in details) == (INVALID, True, False), details
    calls = [
        (lambda: c.report([batch(run_id, 1, [], sender=forged)]), "sender_id"),
        (lambda: c.report([batch(forged, 1, [])]), "run_id"),
        (lambda: c.close_run(forged), "run_id"),
        (lambda: c.list_alerts(run_id=forged), "filter.run_id"),
        (lambda: c.list_alerts(rule="Rule\nForged"), "filter.rule"),
        (lambda: c.list_alerts(states=[99]), "filter.states"),
        (lambda: c.series(forged, "loss"), "run_id"),
        (lambda: c.series(run_id, "probe_loss", probe=forged), "labels['probe']"),
        (lambda: next(iter(c.alerts.WatchAlerts(
            alerts_pb2.WatchAlertsRequest(filter=alerts_pb2.AlertFilter(run_id=forged)),
            timeout=10))), "filter.run_id"),
    ]
    for call, field in calls:
        code, details = code_and_details(call)
        assert (code, field in details, "\n" in details) == (INVALID, True, False), details
    assert c.report([batch(run_id, 1, [sample("loss", 1, 1.0)])])[0].outcome == APPLIED


def test_rejected_batches_are_logged_with_untrusted_text_quoted(
        c: Client, caplog: pytest.LogCaptureFixture) -> None:
    run_id = c.open_run("quoted").run_id
    caplog.set_level("INFO", logger="raresignal.server")
    reject(c, batch(run_id, 1, [], sender="rank0\nERROR raresignal.server: forged"))
    (line,) = [r.getMessage() for r in caplog.records if "batch rejected" in r.getMessage()]
    assert "\n" not in line and "'rank0\\nERROR raresignal.server: forged'" in line


RAW = {"request_serializer": None, "response_deserializer": None}
CORRUPT = b"\x0a\x05ab"  # a length-delimited field that claims more bytes than follow


def test_malformed_protobuf_is_invalid_argument_with_a_plain_message(
        server: ServerHandle) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        unary = [channel.unary_unary(f"/raresignal.v1.{method}", **RAW)
                 for method in ("Ingest/OpenRun", "Ingest/CloseRun", "Alerts/ListAlerts",
                                "Runs/ListRuns", "Runs/GetSeries")]
        calls: list[Callable[[], object]] = [
            *(lambda m=m: m(CORRUPT, timeout=10) for m in unary),
            lambda: list(channel.unary_stream("/raresignal.v1.Alerts/WatchAlerts", **RAW)(
                CORRUPT, timeout=10)),
            lambda: list(channel.stream_stream("/raresignal.v1.Ingest/Report", **RAW)(
                iter([CORRUPT]), timeout=10)),
            lambda: channel.unary_unary("/raresignal.v1.Ingest/OpenRun", **RAW)(
                b"\x0a\x02\xff\xfe", timeout=10),  # run_name that is not UTF-8
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as raised:
                call()
            error = raised.value
            assert error.code() == INVALID, error.details()
            assert "is not a valid protobuf message" in error.details()
            assert "class" not in error.details() and "Error" not in error.details()
        # A well-formed message on the same channel still works.
        ok = channel.unary_unary("/raresignal.v1.Ingest/OpenRun", **RAW)(
            ingest_pb2.OpenRunRequest(run_name="after", world_size=1).SerializeToString(),
            timeout=10)
        assert ingest_pb2.OpenRunResponse.FromString(ok).run.run_name == "after"
