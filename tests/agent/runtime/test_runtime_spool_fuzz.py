"""The spool's reader against damaged files: whatever bytes are flipped, cut, inserted
or appended, it never raises, keeps only records that check out, and keeps every record
the damage did not touch."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from raresignal.agent.spool import Spool, SpoolRecord
from raresignal.protos.v1 import common_pb2, ingest_pb2

SEQUENCES = range(1, 13)


def _batch(sequence: int) -> ingest_pb2.ReportBatch:
    return ingest_pb2.ReportBatch(
        sender_id="rank0-fuzz", sequence=sequence,
        samples=[common_pb2.Sample(metric="loss", step=sequence * 7 + i, value=i / 3)
                 for i in range(sequence % 4 + 1)])


def _pristine() -> tuple[bytes, list[tuple[int, int]]]:
    """The file of every batch in SEQUENCES, and each record's (start, end) offsets."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.spool"
        spool = Spool(path, max_bytes=1 << 20, fsync=False)
        for sequence in SEQUENCES:
            spool.append(_batch(sequence))
        data = path.read_bytes()
    spans, start = [], 0
    for sequence in SEQUENCES:
        end = start + SpoolRecord(sequence, _batch(sequence).SerializeToString(), 0).size
        spans.append((start, end))
        start = end
    assert start == len(data)
    return data, spans


PRISTINE, SPANS = _pristine()

MAX_JUNK = 24
MAX_DAMAGES = 4
# Up to MAX_DAMAGES damages (kind, offset, bytes), at distinct offsets.
damages = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "truncate"]),
                             st.integers(0, len(PRISTINE) - 1),
                             st.binary(min_size=1, max_size=MAX_JUNK)),
                   min_size=1, max_size=MAX_DAMAGES, unique_by=lambda d: d[1])


def _damage(data: bytes, kind: str, offset: int, junk: bytes) -> tuple[bytes, tuple[int, int]]:
    """The damaged bytes and the span of the original file the damage touched."""
    if kind == "flip":
        return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:], (
            offset, offset + 1)
    if kind == "cut":
        # Damages are applied from the end backwards, so the bytes a cut removes may have
        # moved by what later offsets gained or lost: count the most they could have.
        reach = len(junk) + MAX_JUNK * MAX_DAMAGES
        return data[:offset] + data[offset + len(junk):], (offset, offset + reach)
    if kind == "insert":
        return data[:offset] + junk + data[offset:], (offset, offset + 1)
    return data[:offset], (offset, len(data))


@settings(max_examples=150, deadline=None)
@given(damages)
def test_damage_costs_only_the_records_it_touches(found: list[tuple[str, int, bytes]]
                                                  ) -> None:
    data, touched = PRISTINE, []
    # Damage from the end of the file backwards so that earlier offsets keep their meaning.
    for kind, offset, junk in sorted(found, key=lambda d: -d[1]):
        if offset >= len(data):
            continue
        data, span = _damage(data, kind, offset, junk)
        touched.append(span)
    untouched = [sequence for sequence, (start, end) in zip(SEQUENCES, SPANS, strict=True)
                 if not any(start < t_end and t_start < end for t_start, t_end in touched)
                 and not any(t_start == start for t_start, _ in touched)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.spool"
        path.write_bytes(data)
        kept = list(Spool(path, max_bytes=1 << 20, fsync=False))
    kept_sequences = [record.sequence for record in kept]
    for record in kept:
        batch = ingest_pb2.ReportBatch.FromString(record.payload)
        assert batch.sequence == record.sequence >= 1
    for sequence in untouched:
        assert sequence in kept_sequences
        (record,) = [r for r in kept if r.sequence == sequence]
        assert ingest_pb2.ReportBatch.FromString(record.payload) == _batch(sequence)
