"""The overhead benchmark's per-step delay figures: computed right, and printed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import overhead


def test_step_delays_against_the_stall_bound() -> None:
    bare = [0.010] * 9 + [0.5]  # median 10 ms: the bound is the 50 ms floor
    delays = [0.001] * 98 + [0.049, 0.2]
    d = overhead.StepDelays.of(bare, delays, [0.003, 4.5])
    assert d.bare_step_seconds == pytest.approx(0.010)
    assert d.bare_mean_seconds == pytest.approx(0.059)
    assert d.mean == pytest.approx((0.098 + 0.049 + 0.2) / 100)
    assert d.direct_overhead == pytest.approx(d.mean / 0.059)
    assert d.bound == pytest.approx(0.05)
    assert d.median == pytest.approx(0.001)
    assert d.p99 == pytest.approx(0.049)  # the 99th of 100 sorted delays
    assert d.maximum == pytest.approx(0.2)
    assert (d.over_bound, d.steps) == (1, 100)
    assert d.warmup_maximum == pytest.approx(4.5)
    slow = overhead.StepDelays.of([0.1, 0.1, 0.1], delays)
    assert slow.bound == pytest.approx(0.2) and slow.over_bound == 0


@pytest.mark.parametrize("model", ["cnn", "cnn_bn"])
def test_the_benchmark_prints_the_delay_of_every_monitored_step(
        model: str, capsys: pytest.CaptureFixture[str]) -> None:
    overhead.main(["--models", model, "--blocks", "1", "--block-steps", "6",
                   "--warmup-steps", "2", "--threads", "1"])
    out = capsys.readouterr().out
    row = re.search(rf"^{model}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                    r"([\d.]+)\s+(\d+) of (\d+)\s+([\d.]+)$", out, re.MULTILINE)
    assert row is not None, out
    bare, mean, median, p99, maximum, bound = map(float, row.groups()[:6])
    assert 0 < median <= p99 <= maximum and bound >= 50.0 and bare > 0
    assert 0 < mean <= maximum
    assert int(row.group(8)) == 6
    assert re.search(r"overhead timed directly \(mean delay [\d.]+% of a bare step\) "
                     r"against the 3% target: (met|NOT met); throughput ratio -?[\d.]+%",
                     out), out


def test_a_planned_run_reads_the_rare_probes_every_10_steps_and_the_common_one_rarely(
        capsys: pytest.CaptureFixture[str]) -> None:
    overhead.main(["--models", "cnn", "--blocks", "1", "--block-steps", "6",
                   "--warmup-steps", "2", "--threads", "1", "--planned-steps", "5000"])
    out = capsys.readouterr().out
    cadences = dict(re.findall(r"^  (\w+)\s+(\d+)  ", out, re.MULTILINE))
    # 5000 planned steps: the rare probe's loss keeps its 10 (500 readings kept), the
    # common probe's starts at 5000 // 80 = 62 and the budget may stretch it to its floor
    # of 5000 // 40 = 125.
    assert cadences["probe_loss"] == "10", out
    assert 62 <= int(cadences["common_probe_loss"]) <= 125, out


def test_the_null_monitor_run_measures_the_noise_floor_without_monitor_work(
        capsys: pytest.CaptureFixture[str]) -> None:
    overhead.main(["--models", "cnn", "--blocks", "1", "--block-steps", "6",
                   "--warmup-steps", "2", "--threads", "1", "--null-monitor"])
    out = capsys.readouterr().out
    assert "--null-monitor: the monitored blocks did no monitor work" in out
    assert "verdicts" not in out  # no verdict on a monitor that did nothing
    # The real monitor never ran: no self-reported overhead.
    assert re.search(r"^cnn\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+-?[\d.]+%\s+-?[\d.]+%\s+n/a", out,
                     re.MULTILINE), out


def test_the_batch_norm_workload_is_the_cnn_with_batch_norms_under_adamw() -> None:
    workload = overhead.cnn_bn_workload(torch.device("cpu"), 4)
    norms = [m for m in workload.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert workload.name == "cnn_bn" and len(norms) == 2
    assert isinstance(workload.optimizer, torch.optim.AdamW)
    assert not any(isinstance(m, torch.nn.BatchNorm2d)
                   for m in overhead.cnn_workload(torch.device("cpu"), 4).model.modules())
