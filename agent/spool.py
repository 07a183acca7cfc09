"""A local append-only file of report batches that the server has not acknowledged yet.

Every batch is written here before it is sent, so a batch survives the server being down
and, with ``fsync``, the training process dying. Records are length-prefixed and carry a
CRC32, so a write torn by a crash is detected and cut off when the file is reopened.
Acknowledged records are dropped from memory at once and from the file when it is
compacted; a record acknowledged but still on disk after a crash is replayed and the
server answers DUPLICATE, which is why replay is safe.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raresignal.agent.config import MonitorConfig
from raresignal.protos.v1 import ingest_pb2

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")  # payload length, CRC32 of the payload
# Rewrite the file once acknowledged records take more than this many bytes and more
# than the live records do (so compaction costs at most about twice what it frees).
_COMPACT_MIN_DEAD_BYTES = 64 * 1024


@dataclass
class SpoolRecord:
    """One serialized ReportBatch waiting for its acknowledgement."""

    sequence: int
    payload: bytes
    samples: int
    # False until the batch has gone out on a stream at least once; only batches never
    # sent may be renumbered.
    sent: bool = False

    @property
    def size(self) -> int:
        return _HEADER.size + len(self.payload)


def _encode(record: SpoolRecord) -> bytes:
    return _HEADER.pack(len(record.payload), zlib.crc32(record.payload)) + record.payload


class Spool:
    """Unacknowledged batches in sequence order, mirrored in one file."""

    def __init__(self, path: Path, max_bytes: int,
                 fsync: bool = MonitorConfig.spool_fsync) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._records: deque[SpoolRecord] = deque()
        self._live_bytes = 0
        self._file_bytes = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the spool's lifetime

    # -- reading -----------------------------------------------------------------------

    def _load(self) -> None:
        """Reads the records a previous process left, cutting a torn tail."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, offset)
            payload = data[offset + _HEADER.size: offset + _HEADER.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            batch = ingest_pb2.ReportBatch.FromString(payload)
            # Its fate is unknown (it may have been sent and applied): never renumber it.
            self._records.append(SpoolRecord(batch.sequence, payload, len(batch.samples),
                                             sent=True))
            offset += _HEADER.size + length
        if offset < len(data):
            log.warning("spool %s: cut %d bytes of a torn or corrupt record", self.path,
                        len(data) - offset)
            with open(self.path, "r+b") as handle:
                handle.truncate(offset)
        self._live_bytes = self._file_bytes = offset
        if self._records:
            log.info("spool %s: %d unacknowledged batches to replay", self.path,
                     len(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[SpoolRecord]:
        return iter(list(self._records))

    @property
    def live_bytes(self) -> int:
        """Bytes of the records still waiting for an acknowledgement."""
        return self._live_bytes

    @property
    def max_sequence(self) -> int:
        return max((record.sequence for record in self._records), default=0)

    # -- writing -----------------------------------------------------------------------

    def append(self, batch: ingest_pb2.ReportBatch) -> list[SpoolRecord]:
        """Adds a batch; returns the records dropped (oldest first) to stay in bounds."""
        record = SpoolRecord(batch.sequence, batch.SerializeToString(), len(batch.samples))
        dropped: list[SpoolRecord] = []
        if record.size > self.max_bytes:
            return [record]
        while self._records and self._live_bytes + record.size > self.max_bytes:
            dropped.append(self._pop_left())
        self._write(_encode(record))
        self._records.append(record)
        self._live_bytes += record.size
        if dropped:
            self._maybe_compact()
        return dropped

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._file_bytes += len(data)

    def _pop_left(self) -> SpoolRecord:
        record = self._records.popleft()
        self._live_bytes -= record.size
        return record

    def remove(self, sequence: int) -> SpoolRecord | None:
        """Forgets the record with this sequence (acknowledged or rejected)."""
        found = None
        for record in self._records:
            if record.sequence == sequence:
                found = record
                break
        if found is None:
            return None
        self._records.remove(found)
        self._live_bytes -= found.size
        self._maybe_compact()
        return found

    def renumber_unsent(self, first_free_sequence: int) -> int:
        """Shifts the never-sent records so that none is below ``first_free_sequence``.

        A monitor resumed from an older checkpoint numbers its batches from the sequence
        saved there, while the server may already hold higher ones from the process that
        wrote the checkpoint; without the shift those new batches would be taken for
        duplicates. Returns the shift applied (0 when none was needed).
        """
        unsent = [record for record in self._records if not record.sent]
        if not unsent:
            return 0
        shift = first_free_sequence - min(record.sequence for record in unsent)
        if shift <= 0:
            return 0
        for record in unsent:
            batch = ingest_pb2.ReportBatch.FromString(record.payload)
            batch.sequence += shift
            record.sequence = batch.sequence
            old_size = record.size
            record.payload = batch.SerializeToString()
            self._live_bytes += record.size - old_size
        self._rewrite()
        return shift

    def _maybe_compact(self) -> None:
        if not self._records:
            self._file.truncate(0)
            self._file.seek(0)
            self._file_bytes = 0
            return
        dead = self._file_bytes - self._live_bytes
        if dead > _COMPACT_MIN_DEAD_BYTES and dead > self._live_bytes:
            self._rewrite()

    def _rewrite(self) -> None:
        """Atomically replaces the file with the live records."""
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "wb") as handle:
            for record in self._records:
                handle.write(_encode(record))
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        self._file.close()
        os.replace(tmp, self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._file_bytes = self._live_bytes

    def close(self) -> None:
        """Closes the file; deletes it when nothing is left to send."""
        self._file.close()
        if not self._records:
            self.path.unlink(missing_ok=True)
