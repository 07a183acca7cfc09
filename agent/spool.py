"""A local append-only file of report batches that the server has not acknowledged yet.

Every batch is written here before it is sent, so a batch survives the server being down
and, with ``fsync``, the training process dying. Each record starts with a marker, its
length and a CRC32, so a damaged record costs only itself: when the file is reopened, a
record whose bytes do not check out is skipped by scanning to the next marker, and a torn
tail is cut. Acknowledged records are dropped from memory at once and from the file when
it is compacted; a record acknowledged but still on disk after a crash is replayed and
the server answers DUPLICATE, which is why replay is safe.

A spool whose file cannot be read or written (a read-only folder, a full disk) keeps its
records in memory instead: delivery goes on while the process lives, and only a restart
could lose them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError

from raresignal.agent.config import MonitorConfig
from raresignal.protos.v1 import ingest_pb2

log = logging.getLogger(__name__)

_MARKER = b"RSB\x01"  # starts every record; a reader resynchronises on it
_HEADER = struct.Struct("<4sII")  # marker, payload length, CRC32 of the payload
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
    return _HEADER.pack(_MARKER, len(record.payload), zlib.crc32(record.payload)) + (
        record.payload)


def _decode_at(data: bytes, offset: int) -> SpoolRecord | None:
    """The record starting at ``offset``, or None unless every check passes: marker,
    complete length, CRC, and a payload that is a report batch with a sequence."""
    if offset + _HEADER.size > len(data):
        return None
    marker, length, crc = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    payload = data[start:start + length]
    if marker != _MARKER or len(payload) < length or zlib.crc32(payload) != crc:
        return None
    try:
        batch = ingest_pb2.ReportBatch.FromString(payload)
    except DecodeError:
        return None
    if batch.sequence < 1:
        return None
    # Its fate is unknown (it may have been sent and applied): never renumber it.
    return SpoolRecord(batch.sequence, payload, len(batch.samples), sent=True)


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
        self._file: BinaryIO | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._load()
            self._file = open(path, "ab")  # noqa: SIM115 - held open for the spool's lifetime
        except OSError as error:
            self._lose_file(error)

    @property
    def on_disk(self) -> bool:
        """False once the file failed: the records then live in memory only."""
        return self._file is not None

    def _lose_file(self, error: OSError) -> None:
        log.warning("spool %s: %s; unsent batches are kept in memory only from now on "
                    "(a restart would lose them)", self.path, error)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

    # -- reading -----------------------------------------------------------------------

    def _load(self) -> None:
        """Reads the records a previous process left, skipping damaged ones."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        offset = skipped_bytes = damaged = 0
        while offset < len(data):
            record = _decode_at(data, offset)
            if record is not None:
                self._records.append(record)
                offset += record.size
                continue
            following = data.find(_MARKER, offset + 1)
            end = len(data) if following < 0 else following
            skipped_bytes += end - offset
            damaged += 1
            offset = end
        self._live_bytes = sum(record.size for record in self._records)
        if skipped_bytes:
            log.warning("spool %s: skipped %d bytes in %d damaged or torn places; %d batches "
                        "kept", self.path, skipped_bytes, damaged, len(self._records))
            self._replace_file()
        self._file_bytes = self._live_bytes
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
        if self._file is None:
            return
        try:
            self._file.write(data)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as error:
            self._lose_file(error)
            return
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
        if self._file is None:
            return
        if not self._records:
            try:
                self._file.truncate(0)
                self._file.seek(0)
            except OSError as error:
                self._lose_file(error)
            self._file_bytes = 0
            return
        dead = self._file_bytes - self._live_bytes
        if dead > _COMPACT_MIN_DEAD_BYTES and dead > self._live_bytes:
            self._rewrite()

    def _rewrite(self) -> None:
        """Atomically replaces the file with the live records."""
        if self._file is None:
            return
        try:
            self._file.close()
            self._replace_file()
            self._file = open(self.path, "ab")  # noqa: SIM115
        except OSError as error:
            self._file = None
            self._lose_file(error)
            return
        self._file_bytes = self._live_bytes

    def _replace_file(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "wb") as handle:
            for record in self._records:
                handle.write(_encode(record))
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Closes the file; deletes it when nothing is left to send."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not self._records:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
