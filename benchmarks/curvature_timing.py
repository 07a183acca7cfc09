"""Repeated, synchronised timing and the error measure every comparison uses."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Repeated(Generic[T]):
    """Results and wall times of the same measurement run several times."""

    results: list[T]
    seconds: list[float]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(measure: Callable[[int], T], index: int, device: torch.device) -> tuple[T, float]:
    """``measure(index)`` and its wall time in seconds."""
    synchronize(device)
    start = time.perf_counter()
    result = measure(index)
    synchronize(device)
    return result, time.perf_counter() - start


def repeat(measure: Callable[[int], T], repeats: int, device: torch.device) -> Repeated[T]:
    """Calls ``measure(i)`` for i in range(repeats), timing each call on its own."""
    pairs = [timed(measure, i, device) for i in range(repeats)]
    return Repeated([r for r, _ in pairs], [s for _, s in pairs])


def interleaved(measures: Mapping[str, Callable[[int], T]], repeats: int,
                device: torch.device) -> dict[str, Repeated[T]]:
    """Repeat i of every method runs before repeat i + 1 of any, so a change in the load
    of a shared machine falls on all methods alike rather than on whichever ran then."""
    out: dict[str, Repeated[T]] = {name: Repeated([], []) for name in measures}
    for i in range(repeats):
        for name, measure in measures.items():
            result, seconds = timed(measure, i, device)
            out[name].results.append(result)
            out[name].seconds.append(seconds)
    return out


def relative_error(estimate: float, exact: float) -> float:
    """|estimate - exact| / |exact|."""
    return abs(estimate - exact) / abs(exact)
