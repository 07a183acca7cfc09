"""The compact encoding of the samples an evaluation-queue row carries to a run's owner.

A queued report holds the samples the alert rules read and the newest sample of every
other series (``records.samples_to_evaluate``). They are stored as two columns: ``series``,
the JSON list of the distinct (metric, labels key) pairs, and ``points``, four
little-endian columns one after the other: each sample's series index (4 bytes), step,
value and wall time (8 bytes each). A column goes in and out of a typed array in one C
call, where JSON per sample cost more than the rest of a replica's extra CPU over SQLite,
and series names are written once per batch however many steps it holds. The order of the
samples is kept.

Rows written before this encoding hold the samples as JSON text (``samples``), which
:func:`decode_samples` still reads, so a queue left by an older server is evaluated.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

from raresignal.server.storage.records import CheckedSample

_SERIES_KEY = itemgetter(0, 1)
_STEP = itemgetter(2)
_VALUE = itemgetter(3)
_WALL_TIME = itemgetter(4)
# The columns' element types (4-, 8-, 8- and 8-byte), stored little-endian.
_INDEX, _STEPS, _FLOATS = "i", "q", "d"
_SWAP = sys.byteorder != "little"


def _column(typecode: str, values: Iterable[float]) -> bytes:
    column = array(typecode, values)
    if _SWAP:
        column.byteswap()
    return column.tobytes()


def _read(typecode: str, data: bytes) -> array[Any]:
    column = array(typecode)
    column.frombytes(data)
    if _SWAP:
        column.byteswap()
    return column


def encode_samples(samples: Sequence[CheckedSample]) -> tuple[str, bytes]:
    """The ``series`` and ``points`` columns of ``samples``."""
    keys = list(map(_SERIES_KEY, samples))
    distinct = list(dict.fromkeys(keys))
    index = {key: position for position, key in enumerate(distinct)}
    points = b"".join((_column(_INDEX, map(index.__getitem__, keys)),
                       _column(_STEPS, map(_STEP, samples)),
                       _column(_FLOATS, map(_VALUE, samples)),
                       _column(_FLOATS, map(_WALL_TIME, samples))))
    return json.dumps(distinct, separators=(",", ":")), points


def decode_samples(series: str | None, points: bytes | None,
                   legacy: str | None = None) -> list[CheckedSample]:
    """The samples of one queue row: from ``series`` and ``points``, or from the JSON text
    of a row an older server wrote (``legacy``); none for a heartbeat or close."""
    if points is None:
        if legacy is None:
            return []
        return [CheckedSample(*sample) for sample in json.loads(legacy)]
    keys = json.loads(series or "[]")
    metrics = [key[0] for key in keys]
    labels = [key[1] for key in keys]
    count = len(points) // 28
    positions = _read(_INDEX, points[:4 * count])
    steps = _read(_STEPS, points[4 * count:12 * count])
    values = _read(_FLOATS, points[12 * count:20 * count])
    wall_times = _read(_FLOATS, points[20 * count:])
    # tuple.__new__ builds each sample without the named tuple's Python-level __new__.
    return list(map(tuple.__new__, repeat(CheckedSample), zip(
        map(metrics.__getitem__, positions), map(labels.__getitem__, positions),
        steps, values, wall_times, strict=True)))
