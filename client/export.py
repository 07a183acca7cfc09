"""Samples as text: CSV or JSON lines, one row per sample."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from typing import TextIO

from raresignal.protos.v1 import common_pb2

EXPORT_FORMATS = ("csv", "jsonl")
CSV_COLUMNS = ("metric", "labels", "step", "value", "wall_time")


def series_name(metric: str, labels: Mapping[str, str]) -> str:
    """One series as people write it: ``probe_accuracy{probe=rare}``, or the bare metric."""
    if not labels:
        return metric
    return f"{metric}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"


def labels_text(labels: Mapping[str, str]) -> str:
    """A label set in one CSV cell, ``k=v`` pairs joined by ``,`` (empty: no labels)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def write_samples(samples: Iterable[common_pb2.Sample], out: TextIO, export_format: str
                  ) -> int:
    """Writes ``samples`` to ``out`` in ``export_format``; returns how many it wrote."""
    count = 0
    if export_format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for sample in samples:
            writer.writerow((sample.metric, labels_text(sample.labels), sample.step,
                             repr(sample.value), repr(sample.wall_time)))
            count += 1
    elif export_format == "jsonl":
        for sample in samples:
            out.write(json.dumps({"metric": sample.metric, "labels": dict(sample.labels),
                                  "step": sample.step, "value": sample.value,
                                  "wall_time": sample.wall_time}) + "\n")
            count += 1
    else:
        raise ValueError(f"unknown export format {export_format!r}")
    return count
