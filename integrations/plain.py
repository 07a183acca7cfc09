"""A monitor for a plain PyTorch loop, from what the loop already has.

::

    from raresignal.integrations.plain import monitor_for

    monitor = monitor_for(model, optimizer, probes={"rare": rare_loader},
                          common_probe=common_loader, total_steps=epochs * len(loader),
                          server="localhost:50051", run_name="exp-1")

Probes may be given in any shape :func:`raresignal.integrations.torch.to_probe` takes;
``total_steps`` (the optimizer steps the loop will take) sets the cadences
(``raresignal.agent.cadence``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from raresignal.agent import Monitor
from raresignal.integrations.torch import (
    DEFAULT_MAX_PROBE_EXAMPLES,
    ProbeSource,
    move_to,
    to_probe,
    to_probes,
)


def monitor_for(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                probes: Mapping[str, ProbeSource] | None = None,
                common_probe: ProbeSource | None = None,
                total_steps: int | None = None,
                max_probe_examples: int = DEFAULT_MAX_PROBE_EXAMPLES,
                **monitor_arguments: Any) -> Monitor:
    """A :class:`Monitor` with its probes loaded once and on the model's device;
    ``monitor_arguments`` go to the Monitor as they are (server, run_name, config, ...)."""
    device = next(model.parameters()).device
    named = {name: move_to(probe, device)
             for name, probe in to_probes(probes, max_probe_examples).items()}
    common = (move_to(to_probe(common_probe, max_probe_examples), device)
              if common_probe is not None else None)
    return Monitor(model, optimizer, probes=named, common_probe=common,
                   total_steps=total_steps, **monitor_arguments)
