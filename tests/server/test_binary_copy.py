"""Sample rows packed a column at a time are byte for byte PostgreSQL's binary COPY
format, as one ``struct.pack`` per row writes it."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from raresignal.server.storage import binary_copy

rows_strategy = st.dictionaries(
    st.tuples(st.integers(1, 2**63 - 1), st.integers(0, 10**12)),
    st.tuples(st.floats(allow_nan=False), st.floats(0, 4e9)), max_size=40)


@given(rows_strategy)
def test_rows_are_packed_as_the_format_says(
        rows: dict[tuple[int, int], tuple[float, float]]) -> None:
    row = struct.Struct("!hiqiqidid")
    expected = b"".join(row.pack(4, 8, series_id, 8, step, 8, value, 8, wall_time)
                        for (series_id, step), (value, wall_time) in rows.items())
    stream = binary_copy.sample_rows(rows)
    assert stream == b"PGCOPY\n\xff\r\n\0" + bytes(8) + expected + b"\xff\xff"
