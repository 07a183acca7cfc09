"""Every RPC the server offers, fuzzed against one real server on loopback with tokens.

Each method gets hostile messages (odd and huge strings, control characters, NaN and
infinities, edge integers, big maps and lists, forged page tokens), the bytes of such
messages damaged, and arbitrary bytes, from callers with no token, a wrong or malformed
one, a scoped one and an unscoped one. Every call must end with a status the method may
answer (never UNKNOWN, INTERNAL or UNAVAILABLE), every refusal must say why in words, and
no message may quote a token. The last test checks that the server still serves, and
still keeps each team to its own runs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import event, example, given
from hypothesis import strategies as st
from rpc_fuzz_strategies import (
    FORGED_TOKEN,
    KNOWN_RUNS,
    Request,
    batches,
    callers,
    close_runs,
    get_series,
    health_checks,
    heartbeats,
    list_alerts,
    list_runs,
    list_series,
    open_runs,
    reflection_requests,
    requests,
    watch_alerts,
)
from server_support import Client, batch, config, sample

from raresignal.protos.transport import AUTHORIZATION_METADATA_KEY, MAX_MESSAGE_BYTES
from raresignal.protos.v1 import alerts_pb2, common_pb2, ingest_pb2
from raresignal.server.serving.app import ServerHandle, start_in_thread
from raresignal.server.serving.validation import (
    RequestError,
    check_alert_filter,
    encode_page_token,
)

Code = grpc.StatusCode
TOKENS = {"fuzz-admin-7Qm2Xw": ["*"], "fuzz-team-a-9Xk4Rt": ["teamA-*"],
          "fuzz-team-b-3Lp8Zq": ["teamB-*"]}
ADMIN, TEAM_A, TEAM_B = TOKENS
PATTERNS = {ADMIN: ("*",), TEAM_A: ("teamA-*",), TEAM_B: ("teamB-*",)}

# What any call may answer: a refusal of the request or the caller.
REFUSALS = {Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED}
# What each method may answer beyond OK and REFUSALS.
ALLOWED = {
    "/raresignal.v1.Ingest/OpenRun": {Code.NOT_FOUND, Code.PERMISSION_DENIED,
                                      Code.FAILED_PRECONDITION},
    "/raresignal.v1.Ingest/Report": {Code.NOT_FOUND, Code.PERMISSION_DENIED,
                                     Code.FAILED_PRECONDITION},
    "/raresignal.v1.Ingest/Heartbeat": {Code.NOT_FOUND, Code.PERMISSION_DENIED,
                                        Code.FAILED_PRECONDITION},
    "/raresignal.v1.Ingest/CloseRun": {Code.NOT_FOUND, Code.PERMISSION_DENIED,
                                       Code.FAILED_PRECONDITION},
    "/raresignal.v1.Alerts/ListAlerts": {Code.NOT_FOUND, Code.PERMISSION_DENIED},
    "/raresignal.v1.Alerts/WatchAlerts": {Code.NOT_FOUND, Code.PERMISSION_DENIED},
    "/raresignal.v1.Runs/ListRuns": set(),
    "/raresignal.v1.Runs/GetSeries": {Code.NOT_FOUND, Code.PERMISSION_DENIED},
    "/raresignal.v1.Runs/ListSeries": {Code.NOT_FOUND, Code.PERMISSION_DENIED},
    "/grpc.health.v1.Health/Check": {Code.NOT_FOUND},
    "/grpc.health.v1.Health/Watch": set(),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": set(),
}
CALL_TIMEOUT_SECONDS = 60.0
# A WatchAlerts stream that is rightly left open ends at this deadline instead.
OPEN_WATCH_SECONDS = 0.2


@dataclass
class Outcome:
    code: Code
    details: str
    responses: list[bytes] = field(default_factory=list)


@dataclass
class Fuzzed:
    """The server under fuzz, a raw channel to it, and the runs the fuzzing may touch."""

    handle: ServerHandle
    channel: grpc.Channel
    known: dict[str, str]  # placeholder or run id -> run id, for runs that exist

    def resolve(self, message: Message, token: str | None,
                position: tuple[object, ...]) -> bytes:
        """The message's bytes, its run-id placeholders and forged page token filled in."""
        message = type(message).FromString(message.SerializeToString())
        for holder, name in ((message, "run_id"), (message, "resume_run_id"),
                             (getattr(message, "filter", None), "run_id")):
            if holder is not None and name in holder.DESCRIPTOR.fields_by_name:
                value = getattr(holder, name)
                setattr(holder, name, self.known.get(value, value))
        if getattr(message, "page_token", None) == FORGED_TOKEN:
            message.page_token = forged_token(message, PATTERNS.get(token or "", ("*",)),
                                              position)
        return message.SerializeToString()


def forged_token(message: Message, patterns: tuple[str, ...],
                 position: tuple[object, ...]) -> str:
    """A page token with the digest the server expects for ``message`` from a caller with
    ``patterns``, holding a position of the fuzzer's choosing: only the position is wrong."""
    if isinstance(message, alerts_pb2.ListRunsRequest):
        query: tuple[object, ...] = ("ListRuns", message.include_finished, patterns)
    elif isinstance(message, alerts_pb2.ListAlertsRequest):
        f = message.filter
        query = ("ListAlerts", f.run_id, tuple(sorted(set(f.states))), f.rule, patterns)
    elif isinstance(message, alerts_pb2.GetSeriesRequest):
        query = ("GetSeries", message.run_id, message.metric,
                 tuple(sorted(message.labels.items())), message.since_step, patterns)
    else:
        query = ("ListSeries", message.run_id, patterns)
    return encode_page_token(query, position)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("rpc-fuzz")
    with start_in_thread(config(tmp, tokens=TOKENS)) as handle:
        known: dict[str, str] = {}
        for placeholder, token, name in zip(KNOWN_RUNS, (TEAM_A, TEAM_B),
                                            ("teamA-seed", "teamB-seed"), strict=True):
            client = Client(handle.grpc_target, token=token)
            run_id = client.open_run(name).run_id
            client.report([batch(run_id, 1, [sample("probe_loss", 1, 0.5, probe="p0"),
                                             sample("loss", 1, 2.0)])])
            client.close()
            known[placeholder] = known[run_id] = run_id
        channel = grpc.insecure_channel(handle.grpc_target)
        yield Fuzzed(handle, channel, known)
        channel.close()


def metadata(caller: tuple[str, str, str]) -> tuple[list[tuple[str, str]], str | None]:
    """The call's metadata, and the token it presents (None: no token)."""
    kind, wrong, malformed = caller
    token = {"admin": ADMIN, "teamA": TEAM_A, "teamB": TEAM_B,
             "wrong": f"wrong-{wrong}"}.get(kind)
    if kind == "malformed":
        return [(AUTHORIZATION_METADATA_KEY, malformed)], None
    if token is None:
        return [], None
    return [(AUTHORIZATION_METADATA_KEY, f"Bearer {token}")], token


def payload(f: Fuzzed, request: Request, token: str | None) -> bytes:
    if request.message is None:
        return request.raw
    return f.resolve(request.message, token, request.position)


def _failed(error: grpc.RpcError, responses: list[bytes] | None = None) -> Outcome:
    return Outcome(error.code(), error.details() or "", responses or [])


def call_unary(f: Fuzzed, method: str, data: bytes, md: list[tuple[str, str]]) -> Outcome:
    try:
        response, _ = f.channel.unary_unary(method).with_call(
            data, metadata=md, timeout=CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        return _failed(error)
    return Outcome(Code.OK, "", [response])


def call_stream(f: Fuzzed, method: str, data: list[bytes], md: list[tuple[str, str]],
                timeout: float = CALL_TIMEOUT_SECONDS) -> Outcome:
    """A streaming call read to its end (requests, if any, sent as a client stream)."""
    responses: list[bytes] = []
    try:
        if method.endswith(("/Report", "/ServerReflectionInfo")):
            call = f.channel.stream_stream(method)(iter(data), metadata=md, timeout=timeout)
        else:
            (one,) = data
            call = f.channel.unary_stream(method)(one, metadata=md, timeout=timeout)
        for response in call:
            responses.append(response)
    except grpc.RpcError as error:
        return _failed(error, responses)
    return Outcome(Code.OK, "", responses)


def call_first(f: Fuzzed, method: str, data: bytes, md: list[tuple[str, str]]) -> Outcome:
    """A stream that stays open when it succeeds: its first response, then cancelled."""
    call = f.channel.unary_stream(method)(data, metadata=md, timeout=CALL_TIMEOUT_SECONDS)
    try:
        first = next(call)
    except grpc.RpcError as error:
        return _failed(error)
    call.cancel()
    return Outcome(Code.OK, "", [first])


def check(method: str, outcome: Outcome, token: str | None,
          also: frozenset[Code] = frozenset()) -> None:
    """The properties every call must have, whatever was sent."""
    event(outcome.code.name)  # --hypothesis-show-statistics: how often each status came
    allowed = {Code.OK, *REFUSALS, *ALLOWED[method], *also}
    assert outcome.code in allowed, (method, outcome.code, outcome.details)
    if outcome.code != Code.OK:
        details = outcome.details
        assert details.strip() and details.isprintable(), (method, outcome.code, details)
        assert "Traceback" not in details and "<class" not in details, details
    for secret in (*TOKENS, token or ""):
        if secret:
            assert secret not in outcome.details, (method, outcome.details)


def fuzz_unary(f: Fuzzed, method: str, request: Request,
               caller: tuple[str, str, str]) -> Outcome:
    md, token = metadata(caller)
    outcome = call_unary(f, method, payload(f, request, token), md)
    check(method, outcome, token)
    return outcome


# One oversized request: grpc's own limit answers it, before any handler.
OVERSIZED = Request(raw=b"\x0a" + b"\xff\xff\xff\x01" + b"x" * (MAX_MESSAGE_BYTES + 16))
ADMIN_CALLER = ("admin", "", "")


@given(request=requests(open_runs), caller=callers)
@example(request=OVERSIZED, caller=ADMIN_CALLER)
def test_open_run(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    outcome = fuzz_unary(fuzzed, "/raresignal.v1.Ingest/OpenRun", request, caller)
    if outcome.code == Code.OK:
        run_id = ingest_pb2.OpenRunResponse.FromString(outcome.responses[0]).run_id
        fuzzed.known[run_id] = run_id


@given(stream=st.lists(requests(batches), max_size=3), caller=callers)
@example(stream=[Request(message=ingest_pb2.ReportBatch(
    run_id=KNOWN_RUNS[0], sender_id="rank0-fuzz", sequence=2,
    samples=[common_pb2.Sample(metric="loss", step=1, value=1.0)] * 10_001))],
    caller=ADMIN_CALLER)
def test_report(fuzzed: Fuzzed, stream: list[Request], caller: tuple[str, str, str]) -> None:
    md, token = metadata(caller)
    data = [payload(fuzzed, request, token) for request in stream]
    method = "/raresignal.v1.Ingest/Report"
    outcome = call_stream(fuzzed, method, data, md)
    check(method, outcome, token)
    assert len(outcome.responses) <= len(data)


@given(request=requests(heartbeats), caller=callers)
def test_heartbeat(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    fuzz_unary(fuzzed, "/raresignal.v1.Ingest/Heartbeat", request, caller)


@given(request=requests(close_runs), caller=callers)
def test_close_run(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    fuzz_unary(fuzzed, "/raresignal.v1.Ingest/CloseRun", request, caller)


@given(request=requests(list_alerts), caller=callers)
@example(request=Request(message=alerts_pb2.ListAlertsRequest(page_token=FORGED_TOKEN),
                         position=(float("-inf"), "\ud7ff")), caller=ADMIN_CALLER)
def test_list_alerts(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    fuzz_unary(fuzzed, "/raresignal.v1.Alerts/ListAlerts", request, caller)


def watch_stays_open(f: Fuzzed, data: bytes, token: str | None) -> bool:
    """Whether a WatchAlerts call rightly stays open (a valid caller and filter), so that
    only such calls are ended by a short deadline and every other must end by itself."""
    if token not in TOKENS:
        return False
    try:
        request = alerts_pb2.WatchAlertsRequest.FromString(data)
        check_alert_filter(request.filter)
    except (DecodeError, RequestError):
        return False
    return not request.filter.run_id or request.filter.run_id in f.known


@given(request=requests(watch_alerts), caller=callers)
def test_watch_alerts(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    md, token = metadata(caller)
    data = payload(fuzzed, request, token)
    method = "/raresignal.v1.Alerts/WatchAlerts"
    if watch_stays_open(fuzzed, data, token):
        outcome = call_stream(fuzzed, method, [data], md, timeout=OPEN_WATCH_SECONDS)
        check(method, outcome, token, also=frozenset({Code.DEADLINE_EXCEEDED}))
    else:
        check(method, call_stream(fuzzed, method, [data], md), token)


@given(request=requests(list_runs), caller=callers)
@example(request=Request(message=alerts_pb2.ListRunsRequest(page_token=FORGED_TOKEN),
                         position=(float("nan"), "\x00" * 3000)), caller=ADMIN_CALLER)
def test_list_runs(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    fuzz_unary(fuzzed, "/raresignal.v1.Runs/ListRuns", request, caller)


@given(request=requests(get_series), caller=callers)
@example(request=Request(message=alerts_pb2.GetSeriesRequest(
    run_id=KNOWN_RUNS[0], metric="loss", page_token=FORGED_TOKEN), position=(2**80,)),
    caller=ADMIN_CALLER)
@example(request=Request(message=alerts_pb2.GetSeriesRequest(
    run_id=KNOWN_RUNS[0], metric="loss", page_token=FORGED_TOKEN), position=(2**63 - 1,)),
    caller=ADMIN_CALLER)
def test_get_series(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    fuzz_unary(fuzzed, "/raresignal.v1.Runs/GetSeries", request, caller)


@given(request=requests(list_series), caller=callers)
@example(request=Request(message=alerts_pb2.ListSeriesRequest(
    run_id=KNOWN_RUNS[1], page_token=FORGED_TOKEN), position=("\x00", "{")),
    caller=ADMIN_CALLER)
def test_list_series(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    fuzz_unary(fuzzed, "/raresignal.v1.Runs/ListSeries", request, caller)


@given(request=requests(health_checks), caller=callers)
def test_health_check(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    fuzz_unary(fuzzed, "/grpc.health.v1.Health/Check", request, caller)


@given(request=requests(health_checks), caller=callers)
def test_health_watch(fuzzed: Fuzzed, request: Request, caller: tuple[str, str, str]) -> None:
    md, token = metadata(caller)
    method = "/grpc.health.v1.Health/Watch"
    check(method, call_first(fuzzed, method, payload(fuzzed, request, token), md), token)


@given(stream=st.lists(requests(reflection_requests), max_size=3), caller=callers)
def test_reflection(fuzzed: Fuzzed, stream: list[Request],
                    caller: tuple[str, str, str]) -> None:
    md, token = metadata(caller)
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    outcome = call_stream(fuzzed, method, [payload(fuzzed, r, token) for r in stream], md)
    check(method, outcome, token)
    if outcome.code == Code.OK:  # one answer per question, errors inside the answer
        assert len(outcome.responses) == len(stream)
        for response in outcome.responses:
            reflection_pb2.ServerReflectionResponse.FromString(response)


def test_forged_tokens_are_the_tokens_the_server_issues(fuzzed: Fuzzed) -> None:
    """Else every forged token would be refused for its digest and the positions inside
    them would go unfuzzed."""
    client = Client(fuzzed.handle.grpc_target, token=ADMIN)
    request = alerts_pb2.ListRunsRequest(include_finished=True, page_size=1)
    issued = client.runs.ListRuns(request, metadata=client.metadata,
                                  timeout=30).next_page_token
    client.close()
    _, _, *position = json.loads(base64.urlsafe_b64decode(issued + "=" * (-len(issued) % 4)))
    assert forged_token(request, PATTERNS[ADMIN], tuple(position)) == issued


def _all_runs(client: Client) -> list[common_pb2.RunInfo]:
    runs: list[common_pb2.RunInfo] = []
    token = ""
    while True:
        page = client.runs.ListRuns(alerts_pb2.ListRunsRequest(
            include_finished=True, page_size=50, page_token=token),
            metadata=client.metadata, timeout=30)
        runs.extend(page.runs)
        token = page.next_page_token
        if not token:
            return runs


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30).status


def test_the_server_still_serves_and_keeps_teams_apart(fuzzed: Fuzzed) -> None:
    handle = fuzzed.handle
    assert _health(handle.grpc_target) == health_pb2.HealthCheckResponse.SERVING
    assert _health(handle.health_target) == health_pb2.HealthCheckResponse.SERVING
    team_a = Client(handle.grpc_target, token=TEAM_A)
    team_b = Client(handle.grpc_target, token=TEAM_B)
    try:
        run_id = team_a.open_run("teamA-after-fuzz").run_id
        (ack,) = team_a.report([batch(run_id, 1, [sample("loss", step, step / 2)
                                                  for step in range(5)])])
        assert ack.outcome == ingest_pb2.ReportAck.OUTCOME_APPLIED
        assert ack.samples_applied == 5
        assert team_a.series(run_id, "loss") == [(step, step / 2) for step in range(5)]
        a_runs = _all_runs(team_a)
        assert run_id in {run.run_id for run in a_runs}
        b_runs = _all_runs(team_b)
        assert b_runs and all(run.run_name.startswith("teamB-") for run in b_runs)
        assert all(run.run_name.startswith("teamA-") for run in a_runs)
        assert all(alert.run_name.startswith("teamB-") for alert in team_b.list_alerts())
        with pytest.raises(grpc.RpcError) as denied:
            team_b.series(run_id, "loss")
        assert denied.value.code() == Code.PERMISSION_DENIED
    finally:
        team_a.close()
        team_b.close()

