"""Hypothesis strategies for the RPC fuzz suite: hostile but well-formed requests of every
method, raw bytes that are mostly not valid protobuf, and callers with good, scoped,
wrong and malformed credentials.

Run ids and page tokens the fuzzer cannot know in advance are placeholders that the test
resolves at call time: ``KNOWN_RUNS`` name the runs the test opened, and ``FORGED_TOKEN``
asks for a page token with the right digest for the request it ends up in, so the
positions inside tokens get fuzzed, not only their envelope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from raresignal.protos.catalog import CATALOG
from raresignal.protos.v1 import alerts_pb2, common_pb2, ingest_pb2

T = TypeVar("T")
KNOWN_RUNS = ("@known-teamA@", "@known-teamB@")
FORGED_TOKEN = "@forged-page-token@"

INT32_EDGES = [0, 1, -1, 2**31 - 1, -(2**31)]
INT64_EDGES = [0, 1, -1, 10**12, 10**12 + 1, 2**53, 2**63 - 1, -(2**63)]
UINT64_EDGES = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
DOUBLE_EDGES = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308,
                -1.0, 1.7e9]

hostile_text = st.one_of(
    st.text(max_size=40),  # any unicode, control characters included
    st.text(st.characters(codec="ascii"), max_size=200),
    st.sampled_from(["", " ", "\x00", "\n", "a\r\nb", "\u202e", "\U0001f600", "\ufeff",
                     "x" * 129, "y" * 5000, "%s%n{0}", "'; DROP TABLE runs;--", "../../",
                     "*", "teamA-*", "teamB-seed", "probe_loss", "RareSignalFisherCollapse"]),
    st.just("z" * 300_000),
)


def mostly(valid: st.SearchStrategy[T], hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Valid three times in four, so a request with one hostile field is common and the
    checks past the first one get reached."""
    # one_of would pick each distinct strategy equally often, however often it is listed.
    return st.integers(0, 3).flatmap(lambda pick: valid if pick else hostile)


names = mostly(st.sampled_from(["teamA-fuzz", "teamB-fuzz", "other-fuzz", "teamA-x:y/z"]),
               hostile_text)
int32s = st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))
int64s = st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
uint64s = st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, 2**64 - 1))
doubles = st.one_of(st.sampled_from(DOUBLE_EDGES), st.floats())
enums = st.one_of(st.integers(-1, 5), int32s)  # proto3 enums are open: any int32 goes
run_ids = mostly(st.sampled_from(KNOWN_RUNS),
                 st.one_of(st.text("0123456789abcdef", min_size=16, max_size=16), hostile_text))
page_sizes = mostly(st.integers(0, 3), int32s)
string_maps = st.one_of(
    st.just({}), st.just({"lr": "0.1"}), st.dictionaries(hostile_text, hostile_text, max_size=4),
    st.integers(0, 300).map(lambda n: {f"k{i}": "v" * 100 for i in range(n)}),
)
metrics = mostly(st.sampled_from(sorted(CATALOG)), hostile_text)
label_maps = mostly(
    st.one_of(st.just({}), st.dictionaries(st.sampled_from(["probe", "group", "layer"]),
                                           st.sampled_from(["p0", "p1", "g"]), max_size=1)),
    st.dictionaries(hostile_text, hostile_text, max_size=3))
page_tokens = mostly(st.sampled_from(["", FORGED_TOKEN]),
                     st.one_of(hostile_text, st.binary(max_size=60).map(lambda b: b.hex())))
# What a forged token's position holds: each list's types with hostile values (any int,
# NaN, huge strings), and other shapes.
_any_int = st.one_of(int64s, st.integers())
positions = st.one_of(
    st.tuples(doubles, hostile_text), st.tuples(_any_int), st.tuples(hostile_text, hostile_text),
    st.lists(st.one_of(_any_int, doubles, hostile_text, st.none(), st.booleans()),
             max_size=3).map(tuple))


@dataclass(frozen=True)
class Request:
    """One call's payload: a message (its placeholders resolved at call time, a forged
    page token holding ``position``) or raw bytes sent as they are."""

    message: Message | None = None
    raw: bytes = b""
    position: tuple[object, ...] = ()


samples = st.builds(
    lambda metric, labels, step, value, wall: common_pb2.Sample(
        metric=metric, labels=labels, step=step, value=value, wall_time=wall),
    metrics, label_maps, st.one_of(st.integers(0, 100), int64s), doubles,
    st.one_of(st.just(1.7e9), doubles))

open_runs = st.builds(
    lambda name, resume, config, tags, world, interval, version: ingest_pb2.OpenRunRequest(
        run_name=name, resume_run_id=resume, config=config, tags=tags, world_size=world,
        report_interval_seconds=interval, agent_version=version),
    names, mostly(st.just(""), run_ids), string_maps, string_maps,
    mostly(st.just(1), int32s), mostly(st.just(0.0), doubles),
    mostly(st.just(""), hostile_text))
batches = st.builds(
    lambda run_id, sender, sequence, items: ingest_pb2.ReportBatch(
        run_id=run_id, sender_id=sender, sequence=sequence, samples=items),
    run_ids, mostly(st.just("rank0-fuzz"), hostile_text),
    mostly(st.integers(1, 50), uint64s), st.lists(samples, max_size=5))
heartbeats = st.builds(
    lambda run_id, sender, step, wall: ingest_pb2.HeartbeatRequest(
        run_id=run_id, sender_id=sender, step=step, wall_time=wall),
    run_ids, mostly(st.just("rank0-fuzz"), hostile_text), mostly(st.integers(0, 99), int64s),
    mostly(st.just(1.7e9), doubles))
close_runs = st.builds(lambda run_id, state: ingest_pb2.CloseRunRequest(run_id=run_id,
                                                                         state=state),
                       run_ids, mostly(st.integers(0, 4), enums))
alert_filters = st.builds(
    lambda run_id, states, rule: alerts_pb2.AlertFilter(run_id=run_id, states=states,
                                                        rule=rule),
    st.one_of(st.just(""), run_ids), mostly(st.lists(st.integers(0, 3), max_size=3),
                                            st.lists(enums, max_size=4)),
    mostly(st.sampled_from(["", "RareSignalFisherCollapse"]), hostile_text))
list_alerts = st.builds(
    lambda f, limit, size, token: alerts_pb2.ListAlertsRequest(
        filter=f, limit=limit, page_size=size, page_token=token),
    alert_filters, mostly(st.just(0), int32s), page_sizes, page_tokens)
watch_alerts = st.builds(lambda f: alerts_pb2.WatchAlertsRequest(filter=f), alert_filters)
list_runs = st.builds(
    lambda finished, size, token: alerts_pb2.ListRunsRequest(
        include_finished=finished, page_size=size, page_token=token),
    st.booleans(), page_sizes, page_tokens)
get_series = st.builds(
    lambda run_id, metric, labels, since, size, token: alerts_pb2.GetSeriesRequest(
        run_id=run_id, metric=metric, labels=labels, since_step=since, page_size=size,
        page_token=token),
    run_ids, metrics, label_maps, mostly(st.integers(0, 3), int64s), page_sizes, page_tokens)
list_series = st.builds(
    lambda run_id, size, token: alerts_pb2.ListSeriesRequest(
        run_id=run_id, page_size=size, page_token=token),
    run_ids, page_sizes, page_tokens)
health_checks = st.builds(lambda service: health_pb2.HealthCheckRequest(service=service),
                          st.one_of(st.sampled_from(["", "raresignal.v1.Ingest"]),
                                    hostile_text))
reflection_requests = st.one_of(
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(list_services=s),
              hostile_text),
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(file_by_filename=s),
              st.one_of(st.just("raresignal/v1/ingest.proto"), hostile_text)),
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(file_containing_symbol=s),
              st.one_of(st.just("raresignal.v1.Ingest"), hostile_text)),
    st.builds(lambda s, n: reflection_pb2.ServerReflectionRequest(
        file_containing_extension=reflection_pb2.ExtensionRequest(containing_type=s,
                                                                  extension_number=n)),
              hostile_text, int32s),
    st.builds(lambda s: reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type=s),
              hostile_text),
    st.builds(lambda host: reflection_pb2.ServerReflectionRequest(host=host), hostile_text),
)


def _flip(data: bytes, index: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    index %= len(data)
    return data[:index] + bytes([value]) + data[index + 1:]


def requests(messages: st.SearchStrategy[Message]) -> st.SearchStrategy[Request]:
    """A method's payloads: hostile messages, their bytes damaged, or any bytes at all."""
    whole = st.builds(Request, message=messages, position=positions)
    damaged = st.builds(
        lambda message, index, value, cut: Request(
            raw=_flip(message.SerializeToString(), index, value)[:cut]),
        messages, st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 10**6))
    anything = st.builds(Request, raw=st.one_of(
        st.binary(max_size=64), st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f",
                                                 b"\x08" + b"\xff" * 10, b"\x12\x01"])))
    return st.integers(0, 5).flatmap(
        lambda pick: damaged if pick == 4 else anything if pick == 5 else whole)


# Who calls: weighted towards tokens that pass, so the services' own checks are reached.
CALLERS = ("admin", "admin", "admin", "teamA", "teamB", "anonymous", "wrong", "malformed")
callers = st.tuples(st.sampled_from(CALLERS),
                    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                            min_size=8, max_size=40),
                    st.sampled_from(["Bearer", "Basic dXNlcjpwdw==", "bearer   ", "Token x",
                                     "Bearer  ", ""]))
