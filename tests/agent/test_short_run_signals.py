"""With the defaults (budget on, no hand-set cadence) a short planned run of a small model
gets every default signal, the expensive ones several times."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from raresignal.agent import Measurement, Monitor, Probe
from raresignal.agent.estimators import EstimatorConfig

STEPS = 500
EVERY_STEP = ("loss", "grad_norm")
UPDATE_RATIO_EVERY = EstimatorConfig().update_ratio_interval  # a parameter copy per report
# The expensive signals: each at least this many times over the run.
SEVERAL = 3
EXPENSIVE = ("gradient_noise_scale", "subspace_overlap", "sharpness_ratio", "fisher_trace",
             "empirical_fisher_trace", "fisher_effective_rank", "probe_loss",
             "probe_accuracy", "probe_fisher_mass_ratio", "probe_absorption",
             "probe_bulk_residual", "probe_retention", "probe_interference")


class MeasurementCounter:
    """Counts every measurement the estimators hand to reporting, by metric and probe."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, stamped: Sequence[tuple[int, Measurement]]) -> None:
        for _, m in stamped:
            self.counts[m.metric] += 1
            if dict(m.labels).get("probe") == "rare":
                self.counts[f"{m.metric}{{probe=rare}}"] += 1


def _data(n: int, seed: int, rare: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 8, generator=generator)
    targets = (inputs[:, 0] > 0).long() + 2 * int(rare)
    return inputs, targets


def test_a_500_step_run_gets_every_default_signal() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    counter = MeasurementCounter()
    monitor = Monitor(model, optimizer, server=None, run_name="short",
                      probes={"rare": Probe(*_data(24, 2, rare=True))},
                      common_probe=Probe(*_data(48, 3)), total_steps=STEPS,
                      on_measurements=counter)
    train_inputs, train_targets = _data(512, 1)
    for step in range(STEPS):
        index = slice(32 * (step % 16), 32 * (step % 16 + 1))
        inputs, targets = train_inputs[index], train_targets[index]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        monitor.step(loss=loss, batch=(inputs, targets))
        optimizer.step()
    monitor.close()

    counts = counter.counts
    assert not monitor.estimator_errors
    for metric in EVERY_STEP:
        assert counts[metric] >= STEPS - 1, (metric, counts[metric])
    assert counts["update_to_weight_ratio"] >= STEPS // UPDATE_RATIO_EVERY - 1
    missing = {metric: counts[metric] for metric in EXPENSIVE if counts[metric] < SEVERAL}
    assert not missing, f"too few measurements: {missing}"
    for metric in ("probe_retention", "probe_absorption", "probe_interference"):
        assert counts[f"{metric}{{probe=rare}}"] >= SEVERAL
    # The budget may have lowered efforts and stretched cadences, never past a floor.
    for name, schedule in monitor._budget.schedules.items():
        assert schedule.interval <= schedule.max_interval, name
    assert monitor.intervals["gradient_stats"] == 1
