"""What a replica queues for a run's owner: the samples its rules read and each other
series' newest, packed by ``storage.queue_codec`` and read back unchanged (rows in the
older JSON form too)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from raresignal.server.storage.queue_codec import decode_samples, encode_samples
from raresignal.server.storage.records import (
    CheckedSample,
    newest_by_series,
    samples_to_evaluate,
)

RARE = json.dumps({"probe": "rare"}, separators=(",", ":"))
ODD = json.dumps({"probe": 'ré"\\x'}, separators=(",", ":"))

samples_strategy = st.lists(st.builds(
    CheckedSample, st.sampled_from(["loss", "grad_norm", "probe_loss"]),
    st.sampled_from(["{}", RARE, ODD]), st.integers(0, 10**12),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(0, 4e9)), max_size=60)


@given(samples_strategy)
def test_samples_come_back_as_they_were_packed_in_their_order(
        samples: list[CheckedSample]) -> None:
    series, points = encode_samples(samples)
    assert decode_samples(series, points) == samples


def test_a_row_an_older_server_queued_as_json_is_read() -> None:
    samples = [CheckedSample("loss", "{}", 3, 1.5, 10.0), CheckedSample("probe_loss", RARE,
                                                                         3, 0.25, 10.0)]
    legacy = json.dumps([list(sample) for sample in samples])
    assert decode_samples(None, None, legacy) == samples
    assert decode_samples(None, None) == []  # a heartbeat or a close


def test_the_owner_gets_every_sample_its_rules_read_and_the_newest_of_the_rest() -> None:
    samples = [CheckedSample("grad_norm", "{}", 1, 9.0, 1.0),
               CheckedSample("loss", "{}", 1, 1.0, 1.0),
               CheckedSample("grad_norm", "{}", 2, 8.0, 2.0),
               CheckedSample("probe_loss", RARE, 2, 0.5, 2.0),
               CheckedSample("loss", "{}", 2, 2.0, 2.0),
               CheckedSample("loss", "{}", 2, 3.0, 2.5),  # a tied step: the later wins
               CheckedSample("grad_norm", "{}", 3, 7.0, 3.0)]
    newest = newest_by_series(samples)
    kept = samples_to_evaluate(samples, newest, frozenset({"loss"}))
    assert kept == [samples[1], samples[4], samples[5], samples[6], samples[3]]
    # The owner's /metrics and stall clock see what the whole batch would have shown.
    assert newest_by_series(kept) == newest
    assert max(s.step for s in kept) == max(s.step for s in samples)
    assert samples_to_evaluate(samples, newest, frozenset()) == [samples[6], samples[5],
                                                                 samples[3]]
