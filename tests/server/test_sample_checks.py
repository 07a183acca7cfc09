"""The one-pass sample check agrees with the plain definition of a valid sample.

Random batches, valid and not, are checked both ways: the accepted samples must be the
same tuples, and a refused batch must name the first bad sample, as the definition does.
"""

from __future__ import annotations

import math

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from raresignal.protos.catalog import CATALOG
from raresignal.protos.v1 import common_pb2, ingest_pb2
from raresignal.server.serving.validation import (
    MAX_LABEL_VALUE_CHARS,
    MAX_STEP,
    RequestError,
    check_samples,
)
from raresignal.server.storage.records import CheckedSample, labels_key

METRICS = ["loss", "probe_retention", "fisher_trace", "no_such_metric"]
LABEL_KEYS = ["probe", "group", "bogus"]


def first_bad_index(samples: list[common_pb2.Sample]) -> int | None:
    """The definition: the first sample with an unknown metric, a step out of range, a
    non-finite value or wall time, or a label its metric does not allow."""
    for index, s in enumerate(samples):
        spec = CATALOG.get(s.metric)
        if (spec is None or not 0 <= s.step <= MAX_STEP or not math.isfinite(s.value)
                or not math.isfinite(s.wall_time) or s.wall_time < 0):
            return index
        for key, value in s.labels.items():
            if key not in spec.labels or not 0 < len(value) <= MAX_LABEL_VALUE_CHARS:
                return index
    return None


samples_strategy = st.lists(st.builds(
    lambda metric, step, value, wall, labels: common_pb2.Sample(
        metric=metric, step=step, value=value, wall_time=wall, labels=labels),
    st.sampled_from(METRICS),
    st.sampled_from([0, 1, 7, MAX_STEP, MAX_STEP + 1, -1]),
    st.one_of(st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.sampled_from([0.0, 1.7e9, -1.0, math.nan]),
    st.dictionaries(st.sampled_from(LABEL_KEYS),
                    st.sampled_from(["rare", "common", "", "x" * 129]), max_size=2),
), max_size=12)


@settings(max_examples=300, deadline=None)
@given(samples_strategy)
def test_check_samples_matches_the_definition(samples: list[common_pb2.Sample]) -> None:
    batch = ingest_pb2.ReportBatch(run_id="r", sender_id="s", sequence=1, samples=samples)
    bad = first_bad_index(samples)
    if bad is None:
        assert check_samples(batch) == [
            CheckedSample(s.metric, labels_key(dict(s.labels)), s.step, s.value, s.wall_time)
            for s in samples]
        return
    try:
        check_samples(batch)
    except RequestError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.message.startswith(f"samples[{bad}].")
    else:
        raise AssertionError(f"samples[{bad}] is invalid but the batch was accepted")
