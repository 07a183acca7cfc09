"""Training throughput with and without the monitor, measured in one process.

The same model keeps training throughout; blocks of steps alternate between bare
(no monitor call) and monitored (``monitor.step`` every step, default settings, every
default estimator on, rare and common probes given). Alternating blocks in one run means
both sides see the same machine load, CPU frequency and caches; the overhead is one minus
the ratio of the median monitored throughput to the median bare throughput.

Beside the mean cost it reports the delay one ``monitor.step`` call adds to a training
step (mean, median, p99 and maximum), against the stall bound: no step may be delayed by
more than twice the median bare step time, or 50 ms, whichever is larger. The mean delay
over the mean bare step is the monitor's cost timed directly, and the figure the verdict
reads: on a machine shared with other work, where the load shifts between blocks, the
throughput ratio (which also counts any slowdown outside the call) swings by several
points even when the monitor does nothing (``--null-monitor``).

``--null-monitor`` calls a monitor that does nothing in the "monitored" blocks: the
throughput ratio it prints is then the noise floor of the ratio on this machine (an A/A
comparison), to read the real run's ratio against.

Workloads: a ~3M-parameter causal transformer (``causal_lm`` task), a small CNN
(classification), and (``cnn_bn``, not run by default) the same CNN with batch norms,
trained with AdamW. Example::

    python benchmarks/overhead.py --models transformer cnn --blocks 10 --block-steps 100
    python benchmarks/overhead.py --models cnn --blocks 6 --null-monitor   # the noise floor
    python benchmarks/overhead.py --models cnn --planned-steps 5000  # a run of known length
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from raresignal.agent import Monitor, MonitorConfig, Probe


class CausalTransformer(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, causal mask."""

    def __init__(self, vocab: int = 1024, width: int = 256, layers: int = 3, heads: int = 4,
                 context: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        positions = torch.arange(length, device=tokens.device)
        hidden = self.tokens(tokens) + self.positions(positions)
        return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10, batch_norm: bool = False) -> None:
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), norm(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(),
                                  nn.Linear(128, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class Workload:
    """A model, its optimizer, a batch source, its loss and its probes."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    task: str
    probes: dict[str, Probe]
    common_probe: Probe


def transformer_workload(device: torch.device, batch: int) -> Workload:
    model = CausalTransformer().to(device)
    vocab, context = 1024, 64
    generator = torch.Generator(device="cpu").manual_seed(0)

    def sequences(count: int, rare: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Common sequences count upwards; rare ones repeat their first token: two rules.
        start = torch.randint(0, vocab, (count, 1), generator=generator)
        steps = torch.zeros(count, context + 1, dtype=torch.long) if rare else (
            torch.arange(context + 1).expand(count, -1))
        tokens = ((start + steps) % vocab).to(device)
        return tokens[:, :-1], tokens[:, 1:]

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        return sequences(batch, rare=False)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return Workload("transformer", model, torch.optim.AdamW(model.parameters(), lr=3e-4),
                    next_batch, loss, "causal_lm", {"rare": Probe(*sequences(16, True))},
                    Probe(*sequences(16, False)))


def cnn_workload(device: torch.device, batch: int, batch_norm: bool = False) -> Workload:
    model = SmallCNN(batch_norm=batch_norm).to(device)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randn(count, 3, 32, 32, generator=generator)
        labels = (pixels[:, 0, :4, :4].mean(dim=(1, 2)) > 0).long() + 2 * (
            pixels[:, 1, :4, :4].mean(dim=(1, 2)) > 0).long()
        return pixels.to(device), labels.to(device)

    # With batch norms, AdamW: the preconditioned sharpness, whose curvature batch then
    # stays whole in each Hessian-vector product (its statistics are the batch's).
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-3) if batch_norm
                 else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    return Workload("cnn_bn" if batch_norm else "cnn", model, optimizer,
                    lambda: images(batch), nn.functional.cross_entropy, "classification",
                    {"rare": Probe(*images(32))}, Probe(*images(64)))


def cnn_bn_workload(device: torch.device, batch: int) -> Workload:
    return cnn_workload(device, batch, batch_norm=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# No training step may be delayed by the monitor by more than this many median bare step
# times, or STALL_FLOOR_SECONDS, whichever is larger.
STALL_STEP_FACTOR = 2.0
STALL_FLOOR_SECONDS = 0.05


class NullMonitor:
    """A monitor whose step does nothing: the A/A side of the comparison."""

    def step(self, **_: object) -> None:
        return None


def run_block(work: Workload, monitor: Monitor | NullMonitor | None, steps: int,
              device: torch.device,
              step_seconds: list[float] | None = None,
              monitor_seconds: list[float] | None = None) -> float:
    """Trains ``steps`` steps; returns steps per second. Appends each step's wall time to
    ``step_seconds`` and each ``monitor.step`` call's to ``monitor_seconds``."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step_started = time.perf_counter()
        inputs, targets = work.next_batch()
        work.optimizer.zero_grad(set_to_none=True)
        loss = work.loss(work.model(inputs), targets)
        loss.backward()
        if monitor is not None:
            _sync(device)  # the delay is the monitor's own, not queued training work
            call_started = time.perf_counter()
            monitor.step(loss=loss, batch=(inputs, targets))
            _sync(device)
            if monitor_seconds is not None:
                monitor_seconds.append(time.perf_counter() - call_started)
        work.optimizer.step()
        if step_seconds is not None:
            _sync(device)
            step_seconds.append(time.perf_counter() - step_started)
    _sync(device)
    return steps / (time.perf_counter() - started)


@dataclass
class StepDelays:
    """How long ``monitor.step`` held up single steps, against the stall bound."""

    bare_step_seconds: float  # median bare step
    bare_mean_seconds: float
    mean: float
    median: float
    p99: float
    maximum: float
    over_bound: int
    steps: int
    warmup_maximum: float  # the longest call in the untimed steps before the blocks

    @property
    def bound(self) -> float:
        return max(STALL_STEP_FACTOR * self.bare_step_seconds, STALL_FLOOR_SECONDS)

    @property
    def direct_overhead(self) -> float:
        """The mean delay over the mean bare step: the monitor's time, timed directly."""
        return self.mean / self.bare_mean_seconds

    @classmethod
    def of(cls, bare_steps: list[float], delays: list[float],
           warmup_delays: list[float] = ()) -> StepDelays:
        ordered = sorted(delays)
        median_step = statistics.median(bare_steps)
        bound = max(STALL_STEP_FACTOR * median_step, STALL_FLOOR_SECONDS)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        return cls(median_step, statistics.mean(bare_steps), statistics.mean(ordered),
                   statistics.median(ordered), p99, ordered[-1],
                   sum(delay > bound for delay in ordered), len(ordered),
                   max(warmup_delays, default=0.0))


@dataclass
class Result:
    name: str
    parameters: int
    bare: float
    monitored: float
    bare_seconds: float
    monitored_seconds: float
    reported_overhead: float | None
    intervals: dict[str, int]
    estimator_seconds: dict[str, float]
    delays: StepDelays
    warmup_steps: int  # monitored steps before the timed blocks
    cold_after_warmup: list[str]  # expensive estimators with no complete run by then

    @property
    def overhead(self) -> float:
        """From the ratio of median block throughputs (robust to machine noise)."""
        return 1.0 - self.monitored / self.bare

    @property
    def amortized_overhead(self) -> float:
        """From total times: counts the rare blocks where a long-cadence estimator ran,
        which the medians leave out."""
        return self.monitored_seconds / self.bare_seconds - 1.0


def cold_estimators(monitor: Monitor) -> list[str]:
    """The expensive estimators that have not completed a run yet."""
    done = {key[len(ESTIMATOR_SECONDS):-1] for key in monitor.latest()
            if key.startswith(ESTIMATOR_SECONDS)}
    return [name for name, estimator in monitor.estimators.items()
            if estimator.expensive and name not in done]


ESTIMATOR_SECONDS = "agent_estimator_seconds{estimator="


def measure(work: Workload, args: argparse.Namespace, device: torch.device) -> Result:
    monitor = Monitor(work.model, work.optimizer, server=args.server, run_name=work.name,
                      probes=work.probes, common_probe=work.common_probe, task=work.task,
                      config=MonitorConfig(target_overhead=args.target),
                      total_steps=args.planned_steps)
    # Warm-up: allocator, kernels, and the first (cold) run of every estimator. A cold
    # run spread over steps may outlast the fixed warm-up: the monitored warm-up goes on
    # until every expensive estimator has completed one run (or --warmup-max-steps), so
    # the timed blocks measure the steady state the budget keeps.
    stepper = NullMonitor() if args.null_monitor else monitor
    run_block(work, None, args.warmup_steps, device)
    warm_delays: list[float] = []
    run_block(work, stepper, args.warmup_steps, device, monitor_seconds=warm_delays)
    warmup_steps = args.warmup_steps
    while (not args.null_monitor and cold_estimators(monitor)
           and warmup_steps < args.warmup_max_steps):
        run_block(work, monitor, 10, device, monitor_seconds=warm_delays)
        warmup_steps += 10
    bare, monitored = [], []
    bare_steps: list[float] = []
    delays: list[float] = []
    for _ in range(args.blocks):
        bare.append(run_block(work, None, args.block_steps, device, step_seconds=bare_steps))
        monitored.append(run_block(work, stepper, args.block_steps, device,
                                   monitor_seconds=delays))
        if args.verbose:
            print(f"{work.name}: block {len(bare)}: bare {bare[-1]:.2f} steps/s, "
                  f"monitored {monitored[-1]:.2f} steps/s", flush=True)
    latest = monitor.latest()
    monitor.close()
    prefix = ESTIMATOR_SECONDS
    return Result(
        work.name, sum(p.numel() for p in work.model.parameters()),
        statistics.median(bare), statistics.median(monitored),
        sum(args.block_steps / rate for rate in bare),
        sum(args.block_steps / rate for rate in monitored),
        latest.get("agent_overhead_ratio"), monitor.intervals,
        {key[len(prefix):-1]: value for key, value in latest.items()
         if key.startswith(prefix)},
        StepDelays.of(bare_steps, delays, warm_delays), warmup_steps,
        cold_estimators(monitor))


def print_table(results: list[Result], target: float, null_monitor: bool = False) -> None:
    header = (f"{'model':<12}{'params':>10}{'bare steps/s':>14}{'monitored':>11}"
              f"{'overhead':>10}{'amortized':>11}{'self-reported':>15}{'target':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        reported = "n/a" if r.reported_overhead is None else f"{r.reported_overhead:.2%}"
        print(f"{r.name:<12}{r.parameters:>10,}{r.bare:>14.2f}{r.monitored:>11.2f}"
              f"{r.overhead:>10.2%}{r.amortized_overhead:>11.2%}{reported:>15}"
              f"{target:>8.0%}")
    print("\noverhead: 1 - median monitored / median bare block throughput; amortized: "
          "from total times;\nself-reported: the monitor's agent_overhead_ratio "
          f"(its last {MonitorConfig.overhead_window_steps} steps)")
    print(f"\nper-step delay of monitor.step (ms), against the stall bound max("
          f"{STALL_STEP_FACTOR:g} x median bare step, {STALL_FLOOR_SECONDS * 1e3:g} ms); the "
          "warm-up holds each estimator's first (cold) run:")
    print(f"{'model':<12}{'bare step':>10}{'mean':>9}{'median':>9}{'p99':>9}{'max':>9}"
          f"{'bound':>9}{'steps over bound':>18}{'max in warm-up':>16}")
    for r in results:
        d = r.delays
        print(f"{r.name:<12}{d.bare_step_seconds * 1e3:>10.1f}{d.mean * 1e3:>9.2f}"
              f"{d.median * 1e3:>9.2f}"
              f"{d.p99 * 1e3:>9.2f}{d.maximum * 1e3:>9.2f}{d.bound * 1e3:>9.1f}"
              f"{f'{d.over_bound} of {d.steps}':>18}{d.warmup_maximum * 1e3:>16.1f}")
    if null_monitor:
        print("\n--null-monitor: the monitored blocks did no monitor work; the overhead "
              "columns are the noise of the throughput ratio on this machine")
        return
    print("\nverdicts (steady state, after the monitored warm-up):")
    for r in results:
        d = r.delays
        stalls = "met" if d.over_bound == 0 else f"NOT met ({d.over_bound} steps over)"
        within = "met" if d.direct_overhead <= target else "NOT met"
        ratio = "within" if r.overhead <= target else "over"
        print(f"  {r.name}: stall bound {stalls} (max {d.maximum * 1e3:.1f} ms, p99 "
              f"{d.p99 * 1e3:.1f} ms against {d.bound * 1e3:.1f} ms); overhead timed "
              f"directly (mean delay {d.direct_overhead:.2%} of a bare step) against the "
              f"{target:.0%} target: {within}; throughput ratio {r.overhead:.2%} ({ratio} "
              f"the target; its noise on this machine: --null-monitor); "
              f"monitored warm-up {r.warmup_steps} steps"
              + (f", still cold: {', '.join(r.cold_after_warmup)}"
                 if r.cold_after_warmup else ""))
    for r in results:
        print(f"\n{r.name}: estimator (cadence in steps, last complete run in ms: the sum "
              "of its slices for one spread over steps)")
        for name, interval in r.intervals.items():
            seconds = r.estimator_seconds.get(name)
            last = "no complete run" if seconds is None else f"{seconds * 1e3:.1f} ms"
            print(f"  {name:<20}{interval:>7}  {last}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["transformer", "cnn", "cnn_bn"],
                        default=["transformer", "cnn"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--blocks", type=int, default=10,
                        help="bare/monitored block pairs (default: 10)")
    parser.add_argument("--block-steps", type=int, default=100,
                        help="optimizer steps per block (default: 100; blocks x block-steps "
                             "should cover the longest cadence, 500, at least twice)")
    parser.add_argument("--warmup-steps", type=int, default=120,
                        help="steps before measuring, bare then monitored (default: 120, "
                             "past the sharpness warm-up of 100 steps, so the one-off cold "
                             "runs of the estimators start before the blocks; one spread "
                             "over steps may go on into them; their time is printed with "
                             "the cadences)")
    parser.add_argument("--warmup-max-steps", type=int, default=2000,
                        help="the monitored warm-up goes on past --warmup-steps until every "
                             "expensive estimator has completed its first (cold) run, at "
                             "most this many steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 8 sequences / 64 images)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--target", type=float, default=MonitorConfig.target_overhead,
                        help="the monitor's overhead target (default: %(default)s)")
    parser.add_argument("--planned-steps", type=int, default=None, metavar="N",
                        help="tell the monitor the run is planned for N steps (as the "
                             "Lightning and HF callbacks do), so every cadence and floor "
                             "follows the planned-length rule (default: unknown length, "
                             "each estimator's default cadence)")
    parser.add_argument("--server", default=None,
                        help="raresignal server address to report to (default: none, "
                             "measurements stay in process)")
    parser.add_argument("--null-monitor", action="store_true",
                        help="the monitored blocks call a monitor that does nothing: the "
                             "throughput ratio is then the machine's noise floor (A/A)")
    parser.add_argument("--verbose", action="store_true", help="print every block")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    builders = {"transformer": (transformer_workload, 8), "cnn": (cnn_workload, 64),
                "cnn_bn": (cnn_bn_workload, 64)}
    results = []
    for name in args.models:
        build, default_batch = builders[name]
        results.append(measure(build(device, args.batch or default_batch), args, device))
    print_table(results, args.target, args.null_monitor)


if __name__ == "__main__":
    main()
