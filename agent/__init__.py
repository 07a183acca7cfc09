"""The raresignal agent: measures training health inside the training process.

Plain PyTorch::

    from raresignal.agent import Monitor, MonitorConfig, Probe

    monitor = Monitor(model, optimizer, server="127.0.0.1:50051", run_name="exp-1",
                      probes={"rare": Probe(x_rare, y_rare)})
    loss.backward()
    monitor.step(loss=loss, batch=(inputs, targets))
    optimizer.step()
    ...
    monitor.close()
"""

from raresignal.agent.api import (
    DistributedContext,
    Estimator,
    Measurement,
    Probe,
    StepContext,
    default_forward,
    series_key,
)
from raresignal.agent.config import MonitorConfig
from raresignal.agent.monitor import Monitor
from raresignal.protos.transport import TlsConfig

__all__ = [
    "DistributedContext",
    "Estimator",
    "Measurement",
    "Monitor",
    "MonitorConfig",
    "Probe",
    "StepContext",
    "TlsConfig",
    "default_forward",
    "series_key",
]
