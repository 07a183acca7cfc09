"""Checks on every field a client sends, before anything is stored.

A rejected request gets one precise gRPC status and a message that names the offending
field, so a sender can tell a bad batch (drop it) from a transient failure (retry it).

Identifiers have a fixed charset, so no client text can carry a newline or other control
character into a log line, a label or an error message:

- run ids: the ``RUN_ID_CHARS`` lowercase hex digits the server issues;
- run names and sender ids: 1..128 of ``[A-Za-z0-9_.:/-]``;
- label values, map keys and the agent version: 1..128 printable ASCII characters;
- rule names in filters: an ASCII identifier of at most 128 characters;
- sequences: 1 .. 2**63-1 (what storage holds in a signed 64-bit integer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from typing import NoReturn

import grpc

from raresignal.protos.catalog import CATALOG
from raresignal.protos.v1 import alerts_pb2, common_pb2, ingest_pb2
from raresignal.server.storage.records import CheckedSample, labels_key

MAX_NAME_CHARS = 128
RUN_ID_CHARS = 16
MAX_SEQUENCE = 2**63 - 1
MAX_LABEL_VALUE_CHARS = 128
MAX_STEP = 10**12
MAX_SAMPLES_PER_BATCH = 10_000
MAX_SERIES_PER_RUN = 10_000
MAX_MAP_ENTRIES = 256
MAX_MAP_VALUE_CHARS = 4096
MAX_REPORT_INTERVAL_SECONDS = 7 * 24 * 3600.0
MAX_WORLD_SIZE = 1_000_000

_NAME_PATTERN = re.compile(f"[A-Za-z0-9_.:/-]{{1,{MAX_NAME_CHARS}}}")
_RUN_ID_PATTERN = re.compile(f"[0-9a-f]{{{RUN_ID_CHARS}}}")
_PRINTABLE_PATTERN = re.compile(f"[\\x20-\\x7e]{{1,{MAX_NAME_CHARS}}}")
_LABEL_VALUE_PATTERN = re.compile(f"[\\x20-\\x7e]{{1,{MAX_LABEL_VALUE_CHARS}}}")
_RULE_NAME_PATTERN = re.compile(f"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_NAME_CHARS - 1}}}")
_FINISHED_STATES = {
    common_pb2.RUN_STATE_COMPLETED,
    common_pb2.RUN_STATE_FAILED,
    common_pb2.RUN_STATE_ABORTED,
}


class RequestError(Exception):
    """A request the server refuses, with the gRPC status code to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


# Label sets repeat from batch to batch (the same probes, the same layer groups), so the
# canonical text of each (metric, label set) that passed the checks is remembered: a hit
# both validates the labels and gives their key without re-encoding them.
_KEY_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
_KEY_CACHE_SIZE = 65_536
_LABEL_KEYS: dict[str, frozenset[str]] = {
    name: frozenset(spec.labels) for name, spec in CATALOG.items()}


def _valid_labels_key(metric: str, items: tuple[tuple[str, str], ...]) -> str | None:
    """The canonical key of a sorted label set, or None when ``metric`` may not carry it."""
    cached = _KEY_CACHE.get((metric, items))
    if cached is not None:
        return cached
    allowed = _LABEL_KEYS[metric]
    for key, label_value in items:
        if key not in allowed or not _LABEL_VALUE_PATTERN.fullmatch(label_value):
            return None
    if len(_KEY_CACHE) >= _KEY_CACHE_SIZE:
        _KEY_CACHE.clear()
    key_text = _KEY_CACHE[(metric, items)] = labels_key(dict(items))
    return key_text


def check_name(field: str, value: str) -> None:
    """A run name or sender id: 1..128 characters of ``[A-Za-z0-9_.:/-]``."""
    if not value:
        raise invalid(f"{field} is empty")
    if len(value) > MAX_NAME_CHARS:
        raise invalid(f"{field} has {len(value)} characters, more than {MAX_NAME_CHARS}")
    if not _NAME_PATTERN.fullmatch(value):
        raise invalid(f"{field} {value[:40]!r} may only use characters [A-Za-z0-9_.:/-]")


def check_run_id(field: str, value: str) -> None:
    """A run id as the server issues it: ``RUN_ID_CHARS`` lowercase hex digits."""
    if not value:
        raise invalid(f"{field} is empty")
    if not _RUN_ID_PATTERN.fullmatch(value):
        raise invalid(f"{field} {value[:40]!r} is not a run id ({RUN_ID_CHARS} characters "
                      "of [0-9a-f])")


def check_printable(field: str, value: str) -> None:
    """Free text that may reach a label or a log line: 1..128 printable ASCII characters."""
    if not _PRINTABLE_PATTERN.fullmatch(value):
        raise invalid(f"{field} {value[:40]!r} must have 1..{MAX_NAME_CHARS} printable ASCII "
                      "characters")


def check_alert_filter(request_filter: alerts_pb2.AlertFilter) -> None:
    """An alert filter's fields; each may be left empty (no filtering on it)."""
    if request_filter.run_id:
        check_run_id("filter.run_id", request_filter.run_id)
    rule = request_filter.rule
    if rule and not _RULE_NAME_PATTERN.fullmatch(rule):
        raise invalid(f"filter.rule {rule[:40]!r} is not an alert name (letters, digits and "
                      f"_, at most {MAX_NAME_CHARS} characters)")
    known_states = common_pb2.AlertState.values()
    for state in request_filter.states:
        if state not in known_states:
            raise invalid(f"filter.states holds {state}, which is not an alert state")


def check_series_request(request: alerts_pb2.GetSeriesRequest) -> None:
    check_run_id("run_id", request.run_id)
    if request.metric not in CATALOG:
        raise invalid(f"metric {request.metric[:MAX_NAME_CHARS]!r} is not in the raresignal "
                      "catalogue")
    for key, label_value in sorted(request.labels.items()):
        check_printable("labels key", key)
        check_printable(f"labels[{key!r}]", label_value)


def _check_map(field: str, entries: dict[str, str]) -> None:
    if len(entries) > MAX_MAP_ENTRIES:
        raise invalid(f"{field} has {len(entries)} entries, more than {MAX_MAP_ENTRIES}")
    for key, value in entries.items():
        check_printable(f"{field} key", key)
        if len(value) > MAX_MAP_VALUE_CHARS:
            raise invalid(f"{field}[{key!r}] has {len(value)} characters, more than "
                          f"{MAX_MAP_VALUE_CHARS}")


# The most bytes a map entry adds beyond its key and value: the entry's tag and length, and
# the key's and the value's (one-byte tags, lengths of at most five bytes each).
_MAP_ENTRY_FRAMING_BYTES = 18


def check_metadata_entries(request: ingest_pb2.OpenRunRequest) -> None:
    """Refuses too many config or tag entries by the decoder's count, before any is copied."""
    for field, entries in (("config", request.config), ("tags", request.tags)):
        if len(entries) > MAX_MAP_ENTRIES:
            raise invalid(f"{field} has {len(entries)} entries, more than {MAX_MAP_ENTRIES}")


def metadata_bytes_at_least(request: ingest_pb2.OpenRunRequest) -> int:
    """A lower bound of the UTF-8 bytes of the request's config and tags (every key and
    value), from sizes the decoder already holds: no key or value becomes a Python string,
    so a request far over the quota is refused before it is copied."""
    rest = ingest_pb2.OpenRunRequest()
    for field, value in request.ListFields():
        if field.name not in ("config", "tags"):
            setattr(rest, field.name, value)
    entries = len(request.config) + len(request.tags)
    return request.ByteSize() - rest.ByteSize() - _MAP_ENTRY_FRAMING_BYTES * entries


def check_open_run(request: ingest_pb2.OpenRunRequest) -> None:
    check_name("run_name", request.run_name)
    if request.resume_run_id:
        check_run_id("resume_run_id", request.resume_run_id)
    if not 1 <= request.world_size <= MAX_WORLD_SIZE:
        raise invalid(f"world_size must be between 1 and {MAX_WORLD_SIZE}, "
                      f"got {request.world_size}")
    interval = request.report_interval_seconds
    if not math.isfinite(interval) or not 0 <= interval <= MAX_REPORT_INTERVAL_SECONDS:
        raise invalid("report_interval_seconds must be finite and between 0 and "
                      f"{MAX_REPORT_INTERVAL_SECONDS:g}, got {interval!r}")
    if request.agent_version:
        check_printable("agent_version", request.agent_version)
    _check_map("config", dict(request.config))
    _check_map("tags", dict(request.tags))


def check_close_state(state: int) -> int:
    """The state a run is closed with: COMPLETED when unspecified."""
    if state == common_pb2.RUN_STATE_UNSPECIFIED:
        return common_pb2.RUN_STATE_COMPLETED
    if state not in _FINISHED_STATES:
        name = common_pb2.RunState.Name(state) if state in common_pb2.RunState.values() else state
        raise invalid(f"state must be COMPLETED, FAILED or ABORTED to close a run, got {name}")
    return state


def check_batch_envelope(batch: ingest_pb2.ReportBatch) -> None:
    """The fields that say where a batch goes, checked before its samples."""
    check_run_id("run_id", batch.run_id)
    check_name("sender_id", batch.sender_id)
    if batch.sequence < 1:
        raise invalid("sequence must be >= 1")
    if batch.sequence > MAX_SEQUENCE:
        raise invalid(f"sequence {batch.sequence} is above the largest allowed, 2**63-1")
    if len(batch.samples) > MAX_SAMPLES_PER_BATCH:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"samples has {len(batch.samples)} entries, more than {MAX_SAMPLES_PER_BATCH} "
            "per batch; split the batch",
        )


def check_samples(batch: ingest_pb2.ReportBatch) -> list[CheckedSample]:
    """Every sample of a batch, checked; the first bad one rejects the whole batch.

    One pass that reads each field once and builds the checked tuples directly: this runs
    for every sample the server receives. A batch with any problem is scanned again by
    :func:`_reject_first_bad_sample`, which names the offending sample and field.
    """
    checked: list[CheckedSample] = []
    append = checked.append
    make = tuple.__new__
    known = _LABEL_KEYS
    inf = math.inf
    for sample in batch.samples:
        metric = sample.metric
        step = sample.step
        value = sample.value
        wall_time = sample.wall_time
        # Chained comparisons are false for NaN, so they test finiteness without a call.
        if (metric not in known or not 0 <= step <= MAX_STEP or not -inf < value < inf
                or not 0.0 <= wall_time < inf):
            _reject_first_bad_sample(batch)
        labels = sample.labels
        if labels:
            # Iterating the map and indexing it is several times cheaper than .items().
            if len(labels) == 1:
                for name in labels:
                    items: tuple[tuple[str, str], ...] = ((name, labels[name]),)
            else:
                items = tuple(sorted([(name, labels[name]) for name in labels]))
            key_text = _valid_labels_key(metric, items)
            if key_text is None:
                _reject_first_bad_sample(batch)
        else:
            key_text = "{}"
        append(make(CheckedSample, (metric, key_text, step, value, wall_time)))
    return checked


def _reject_first_bad_sample(batch: ingest_pb2.ReportBatch) -> NoReturn:
    """Raises the error that names the first bad sample of a batch known to have one."""
    for index, sample in enumerate(batch.samples):
        metric = sample.metric
        spec = CATALOG.get(metric)
        if spec is None:
            raise invalid(f"samples[{index}].metric {metric[:MAX_NAME_CHARS]!r} is not in the "
                          "raresignal catalogue")
        step = sample.step
        if not 0 <= step <= MAX_STEP:
            raise invalid(f"samples[{index}].step {step} of metric {metric!r} is outside "
                          f"0..{MAX_STEP}")
        value = sample.value
        if not math.isfinite(value):
            raise invalid(f"samples[{index}].value of metric {metric!r} at step {step} is not "
                          f"finite ({value!r})")
        wall_time = sample.wall_time
        if not math.isfinite(wall_time) or wall_time < 0:
            raise invalid(f"samples[{index}].wall_time of metric {metric!r} must be finite "
                          f"and >= 0, got {wall_time!r}")
        for key, label_value in sorted(sample.labels.items()):
            if key not in spec.labels:
                allowed = ", ".join(spec.labels) or "none"
                raise invalid(f"samples[{index}].labels key {key[:MAX_NAME_CHARS]!r} is "
                              f"not allowed on metric {metric!r} (allowed: {allowed})")
            if not label_value or len(label_value) > MAX_LABEL_VALUE_CHARS:
                raise invalid(f"samples[{index}].labels[{key!r}] must have 1.."
                              f"{MAX_LABEL_VALUE_CHARS} characters, got {len(label_value)}")
            if not _LABEL_VALUE_PATTERN.fullmatch(label_value):
                raise invalid(f"samples[{index}].labels[{key!r}] may only use printable "
                              "ASCII characters")
    raise AssertionError("a batch rejected by the fast check has no bad sample")


# -- paging ------------------------------------------------------------------------------
#
# A list answers in pages under two bounds: a number of items (the request's page_size,
# at most the list's maximum) and PAGE_BYTES, the encoded size past which a page ends
# early (it always holds one item, and one item of the largest kind, a run with full
# config and tags maps, is about 2.2 MB). The item maxima follow from the field limits
# above, so a page of maximal items stays under PAGE_BYTES by count alone:
#
# - an alert: ids 20 + 16, run name and rule 128 each, one label of 128 (no metric has
#   more), a summary of up to 1 KiB, numbers and tags: under 1.6 KiB;
#   500 of them: under 0.8 MiB;
# - a sample: a metric name under 64, one label of 128, three numbers: under 256 B;
#   2000 of them: under 0.5 MiB;
# - a run: up to 2 * 256 map entries of 4 KiB each, so the byte bound, not the count,
#   limits a page of large runs.
# The alert and sample maxima are also what keeps every page under 100 ms with 100,000
# alerts stored: the time of a full page is its rows turned into messages, about
# 30-40 us an item (benchmarks/list_latency.py).
PAGE_BYTES = 2 * 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_ALERTS_PAGE_SIZE = 500
MAX_RUNS_PAGE_SIZE = 1000
MAX_SERIES_PAGE_SIZE = 1000
MAX_SAMPLES_PAGE_SIZE = 2000
_TOKEN_VERSION = 1
_TOKEN_DIGEST_CHARS = 16


def check_page_size(page_size: int, maximum: int) -> int:
    """The page size a request asks for: the default when 0, the maximum when above it."""
    if page_size < 0:
        raise invalid(f"page_size must be >= 0, got {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, maximum)


def _query_digest(query: tuple[object, ...]) -> str:
    return hashlib.sha256(repr(query).encode()).hexdigest()[:_TOKEN_DIGEST_CHARS]


def encode_page_token(query: tuple[object, ...], position: tuple[object, ...]) -> str:
    """An opaque token for the page after ``position`` of the list ``query`` describes.

    ``query`` names the list, its filter and the caller's scope, so a token sent with
    another request is refused rather than resuming a different list. Nothing in it is
    secret or trusted: every page applies the caller's scope again.
    """
    text = json.dumps([_TOKEN_VERSION, _query_digest(query), *position],
                      separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _issuable(value: object) -> bool:
    """Whether a position value is one a page of this server can end at: times are finite
    and steps (the only integers) in 0..MAX_STEP. The digest in a token is no secret, so a
    caller can write a token by hand, and storage must never see, say, a step past 2**63."""
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is int:
        return 0 <= value <= MAX_STEP
    return True


def decode_page_token(token: str, query: tuple[object, ...],
                      position_types: tuple[type, ...]) -> tuple[object, ...] | None:
    """The position a token resumes after (None for an empty token: the first page), or
    INVALID_ARGUMENT for a token this server did not issue for ``query``."""
    if not token:
        return None
    try:
        if len(token) > 1024:
            raise ValueError("too long")
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise invalid("page_token is not a page token this server issued") from None
    if (not isinstance(decoded, list) or len(decoded) != 2 + len(position_types)
            or decoded[0] != _TOKEN_VERSION
            or not all(type(value) is kind and _issuable(value)
                       for value, kind in zip(decoded[2:], position_types, strict=True))):
        raise invalid("page_token is not a page token this server issued")
    if decoded[1] != _query_digest(query):
        raise invalid("page_token belongs to another request (another list, filter or "
                      "token); send the request it came from")
    return tuple(decoded[2:])
