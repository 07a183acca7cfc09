"""Two real processes under torch.distributed (gloo, CPU): sketches merge exactly and the
ranks run the same estimators at the same steps."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_toys import (
    CollectiveEstimator,
    ResumableCollectiveEstimator,
    SleepyEstimator,
    classification_data,
    small_classifier,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raresignal.agent import Monitor, MonitorConfig
from raresignal.agent.distributed import build_context
from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.sketch import GradientSketcher

WORLD = 2
DIM = 256


def _full_batch_gradients() -> tuple[nn.Module, list[torch.Tensor]]:
    model = small_classifier(seed=0)
    inputs, targets = classification_data(n=32)
    nn.functional.cross_entropy(model(inputs), targets).backward()
    return model, [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        context = build_context()
        results["context"] = (context.rank, context.world_size)
        inputs, targets = classification_data(n=32)
        local = slice(rank * 16, (rank + 1) * 16)

        # 1. DDP averages the gradients: the sketch of the synced gradient on each rank.
        model = DistributedDataParallel(small_classifier(seed=0))
        sketcher = GradientSketcher(ParameterSet.from_model(model), dim=DIM, seed=7)
        nn.functional.cross_entropy(model(inputs[local]), targets[local]).backward()
        results["ddp_sketch"] = sketcher.sketch_grads()

        # 2. Local gradients (no DDP sync), sketched per rank and merged with one all-reduce
        # through the monitor's context: the sketch is linear, so the sum of the per-rank
        # sketches over the world size is the sketch of the average gradient.
        model.zero_grad()
        with model.no_sync():
            nn.functional.cross_entropy(model(inputs[local]), targets[local]).backward()
        results["merged_sketch"] = context.all_reduce_sum(sketcher.sketch_grads()) / WORLD

        # 3. A sharded flat parameter: each rank holds one slice of the whole gradient and
        # sketches it at its global offset; the all-reduced shard sketches are the sketch
        # of the whole.
        _, full_grads = _full_batch_gradients()
        flat = torch.cat([g.flatten() for g in full_grads])
        bounds = [0, 123, flat.numel()]  # uneven shards, as FSDP padding makes them
        shard = flat[bounds[rank]:bounds[rank + 1]]
        shard_sketcher = GradientSketcher(ParameterSet.from_model(small_classifier()),
                                          dim=DIM, seed=7)
        results["shard_sketch"] = context.all_reduce_sum(
            shard_sketcher.sketch_tensor("flat_param", shard, offset=bounds[rank]))

        # 4. The monitor under DDP: rank 1 is slower at the expensive estimator, yet both
        # ranks must decide the same cadences (collectives would hang otherwise).
        monitor = Monitor(
            model, None, server="127.0.0.1:9", run_name="ddp",
            estimators=[
                CollectiveEstimator("toy_every_step", 1, expensive=False),
                CollectiveEstimator("toy_collective_a", 2, expensive=True),
                CollectiveEstimator("toy_collective_b", 2, expensive=True),
                SleepyEstimator("toy_uneven", 0.002 * (1 + 4 * rank), default_interval=1),
            ],
            config=MonitorConfig(spool_dir=out_dir, close_timeout_seconds=0,
                                 network_timeout_seconds=0.2, budget_adjust_every_steps=5),
        )
        for _ in range(40):
            time.sleep(0.005)  # the training step the overhead is measured against
            monitor.step(loss=torch.tensor(1.0))
        results["sends"] = monitor.sender is not None
        results["runs"] = {name: list(e.runs) for name, e in monitor.estimators.items()}
        results["intervals"] = monitor.intervals
        results["reduced"] = monitor.latest()["hessian_trace"]
        monitor.close()

        # 5. A resumable measurement whose units all-reduce, slower on rank 1: the ranks
        # agree after each unit whether to go on, so they run the same units each step.
        resumable = ResumableCollectiveEstimator("toy_resumable", units=12,
                                                 unit_seconds=0.002 * (1 + 4 * rank))
        monitor = Monitor(model, None, estimators=[resumable],
                          config=MonitorConfig(resumable_slice_min_seconds=0.02))
        units_after_step = []
        for _ in range(40):
            monitor.step(loss=torch.tensor(1.0))
            units_after_step.append(resumable.units_done)
        results["units_after_step"] = units_after_step
        results["resumed_total"] = monitor.latest()["sharpness"]
        monitor.close()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_merge_sketches_and_agree_on_the_schedule(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    model, full_grads = _full_batch_gradients()
    sketcher = GradientSketcher(ParameterSet.from_model(model), dim=DIM, seed=7)
    reference = sketcher.sketch(full_grads)
    flat = torch.cat([g.flatten() for g in full_grads])
    flat_reference = sketcher.sketch_tensor("flat_param", flat, offset=0)
    # float32 gradients summed in another order (two half-batch means averaged vs one
    # full-batch mean, then bucket sums): relative error of a few float32 ulps per term.
    tolerance = 1e-5 * float(reference.norm())

    for rank, result in enumerate(ranks):
        assert result["context"] == (rank, WORLD)
        assert (result["ddp_sketch"] - reference).abs().max() <= tolerance
        assert (result["merged_sketch"] - reference).abs().max() <= tolerance
        # Same float32 values summed per bucket in two parts instead of one.
        assert (result["shard_sketch"] - flat_reference).abs().max() <= 1e-5 * float(
            flat_reference.norm())
        assert result["reduced"] == 3.0  # rank 0 sent 1, rank 1 sent 2: one all-reduce

    assert ranks[0]["sends"] and not ranks[1]["sends"]  # only rank_to_send talks
    assert ranks[0]["runs"] == ranks[1]["runs"]
    assert ranks[0]["intervals"] == ranks[1]["intervals"]
    runs = ranks[0]["runs"]
    assert runs["toy_every_step"][:5] == list(range(5))  # before the first decision
    # The uneven estimator was stretched from the slower rank's timings on both ranks.
    assert ranks[0]["intervals"]["toy_uneven"] > 1
    expensive = ("toy_collective_a", "toy_collective_b", "toy_uneven")
    steps = [step for name in expensive for step in runs[name]]
    assert len(steps) == len(set(steps))  # never two expensive estimators in one step
    # The resumable measurement: the same units at the same steps on both ranks, every
    # all-reduce paired (12 units of 1 + 2), and all of them run.
    assert ranks[0]["units_after_step"] == ranks[1]["units_after_step"]
    assert ranks[0]["units_after_step"][-1] == 12
    assert ranks[0]["resumed_total"] == ranks[1]["resumed_total"] == 36.0
