"""The spool keeps unacknowledged batches across process restarts, in order, bounded."""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

from raresignal.agent.spool import Spool, SpoolRecord
from raresignal.protos.v1 import common_pb2, ingest_pb2


def _batch(sequence: int, samples: int = 3) -> ingest_pb2.ReportBatch:
    return ingest_pb2.ReportBatch(
        sender_id="rank0-test", sequence=sequence,
        samples=[common_pb2.Sample(metric="loss", step=sequence * 10 + i, value=float(i))
                 for i in range(samples)])


def test_unacknowledged_batches_survive_a_reopen_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_bytes=1 << 20)
    for sequence in (1, 2, 3, 4):
        assert spool.append(_batch(sequence)) == []
    assert spool.remove(2) is not None
    spool._file.close()  # a crash: nothing compacted, acknowledged records still on disk

    reopened = Spool(path, max_bytes=1 << 20)
    # Record 2 comes back (its acknowledgement was not compacted): replaying it is safe,
    # the server answers DUPLICATE. Order and content are intact.
    assert [r.sequence for r in reopened] == [1, 2, 3, 4]
    assert [ingest_pb2.ReportBatch.FromString(r.payload) for r in reopened] == [
        _batch(s) for s in (1, 2, 3, 4)]
    assert all(r.sent for r in reopened), "records of an earlier process are never renumbered"


def test_a_torn_tail_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_bytes=1 << 20)
    spool.append(_batch(1))
    spool.append(_batch(2))
    spool._file.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the last write was cut short by a crash

    reopened = Spool(path, max_bytes=1 << 20)
    assert [r.sequence for r in reopened] == [1]
    assert path.stat().st_size == reopened.live_bytes
    reopened.append(_batch(3))
    reopened._file.close()
    assert [r.sequence for r in Spool(path, max_bytes=1 << 20)] == [1, 3]


def test_a_full_spool_drops_the_oldest_batches(tmp_path: Path) -> None:
    one = SpoolRecord(1, _batch(1).SerializeToString(), 3).size
    spool = Spool(tmp_path / "s.spool", max_bytes=3 * one + 2)
    dropped = []
    for sequence in range(1, 7):
        dropped += spool.append(_batch(sequence))
    assert [r.sequence for r in dropped] == [1, 2, 3]
    assert [r.samples for r in dropped] == [3, 3, 3]
    assert [r.sequence for r in spool] == [4, 5, 6]
    assert spool.live_bytes <= spool.max_bytes


def test_acknowledging_everything_empties_the_file_and_close_deletes_it(
        tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_bytes=1 << 20)
    for sequence in (1, 2):
        spool.append(_batch(sequence))
    assert path.stat().st_size > 0
    spool.remove(1)
    spool.remove(2)
    assert path.stat().st_size == 0
    spool.close()
    assert not path.exists()


def test_compaction_bounds_the_file_by_the_live_records(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_bytes=1 << 24)
    for sequence in range(1, 401):
        spool.append(_batch(sequence, samples=20))
    full_size = path.stat().st_size
    for sequence in range(1, 391):
        spool.remove(sequence)
    # Acknowledged records are rewritten away once they outweigh the live ones (and pass
    # the 64 KiB floor that keeps compaction rare), so the file holds at most that much
    # beyond the live records.
    assert path.stat().st_size <= spool.live_bytes + 64 * 1024 < full_size
    spool._file.close()
    replay = [r.sequence for r in Spool(path, max_bytes=1 << 24)]
    assert replay[-10:] == list(range(391, 401))
    assert replay == list(range(replay[0], 401)) and replay[0] > 200


def test_renumbering_moves_only_never_sent_records(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path, max_bytes=1 << 20)
    spool.append(_batch(5))
    next(iter(spool)).sent = True
    spool.append(_batch(6))
    spool.append(_batch(7))

    assert spool.renumber_unsent(first_free_sequence=10) == 4
    assert [r.sequence for r in spool] == [5, 10, 11]
    assert [ingest_pb2.ReportBatch.FromString(r.payload).sequence for r in spool] == [
        5, 10, 11]
    assert spool.renumber_unsent(first_free_sequence=3) == 0
    spool._file.close()
    assert [r.sequence for r in Spool(path, max_bytes=1 << 20)] == [5, 10, 11]


def _spool_with(path: Path, sequences: range) -> bytes:
    spool = Spool(path, max_bytes=1 << 20)
    for sequence in sequences:
        spool.append(_batch(sequence))
    spool._file.close()  # a crash: the file stays as written
    return path.read_bytes()


def test_a_damaged_record_costs_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    whole = bytearray(_spool_with(path, range(1, 41)))
    whole[100] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(whole))
    ends = itertools.accumulate(
        SpoolRecord(s, _batch(s).SerializeToString(), 3).size for s in range(1, 41))
    damaged = next(s for s, end in zip(range(1, 41), ends, strict=True) if end > 100)

    reopened = Spool(path, max_bytes=1 << 20)
    assert [r.sequence for r in reopened] == [s for s in range(1, 41) if s != damaged]
    assert path.stat().st_size == reopened.live_bytes, "the damaged bytes leave the file"
    reopened._file.close()
    assert len(Spool(path, max_bytes=1 << 20)) == 39


def test_a_record_with_a_valid_crc_that_is_no_batch_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    whole = _spool_with(path, range(1, 4))
    junk = b"\xff\xff\xff\xff not a protobuf"
    forged = struct.pack("<4sII", whole[:4], len(junk), zlib.crc32(junk)) + junk
    path.write_bytes(forged + whole + forged)

    assert [r.sequence for r in Spool(path, max_bytes=1 << 20)] == [1, 2, 3]


def test_an_unwritable_spool_keeps_batches_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool folder should be")
    spool = Spool(blocker / "s.spool", max_bytes=1 << 20)
    assert not spool.on_disk
    for sequence in (1, 2, 3):
        assert spool.append(_batch(sequence)) == []
    assert spool.remove(2) is not None
    assert [r.sequence for r in spool] == [1, 3]
    spool.close()
