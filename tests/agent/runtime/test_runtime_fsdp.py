"""Two real processes under FSDP2 (``fully_shard``, gloo, CPU): the monitor's sketches and
grad norm from sharded gradients equal those of the full gradient in one process, the
estimators that need whole parameters step aside on every rank, and nothing hangs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raresignal.agent import Monitor, MonitorConfig
from raresignal.agent.api import Probe
from raresignal.agent.estimators import EstimatorConfig
from raresignal.agent.estimators.gradient_stats import UpdateRatioTracker, parameter_sketch
from raresignal.agent.estimators.parameters import ParameterSet, local_part
from raresignal.agent.estimators.sketch import GradientSketcher

fsdp = pytest.importorskip("torch.distributed.fsdp")

WORLD = 2
DIM = 256
SEED = 7
STEPS = 8
LR = 0.1
# Needs whole parameters in one process: off under FSDP, on every rank alike.
WHOLE_PARAMETER_ESTIMATORS = ("noise_scale", "sharpness", "fisher", "probes")
SAME_ON_EVERY_RANK = ("grad_norm", "update_to_weight_ratio", "subspace_overlap",
                      "subspace_max_angle_radians")


def _model() -> nn.Module:
    """7 and 3 output rows: split 4 + 3 and 2 + 1 over two ranks (uneven shards)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,),
                                                                  generator=generator)


def _config() -> EstimatorConfig:
    return EstimatorConfig(
        sketch_dim=DIM, seed=SEED, fd_rows=8, subspace_rank=2, subspace_interval=1,
        drift_interval=2, update_ratio_interval=2, noise_scale_interval=1,
        sharpness_interval=1, fisher_interval=1, probes_interval=1)


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    try:
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fsdp.fully_shard(layer)
        fsdp.fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        inputs, targets = _data()
        local = slice(rank * 16, (rank + 1) * 16)
        monitor = Monitor(
            model, optimizer, server=None, run_name="fsdp",
            probes={"rare": Probe(inputs[:4], targets[:4])},
            # Cadences stay at their defaults (factor 1), so gradient_stats reports every
            # step; the scheduler still all-reduces its timings every 3 steps.
            config=MonitorConfig(estimator_config=_config(), budget_adjust_every_steps=3,
                                 max_interval_factor=1))
        shared = monitor.estimators["gradient_stats"].shared
        results: dict[str, Any] = {"grad_norms": [], "offsets": {}}
        for name, p in shared.parameters:
            part = local_part(p)
            results["offsets"][name] = (part.offset, part.values.numel())
        for step in range(STEPS):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[local]), targets[local])
            loss.backward()
            monitor.step(loss=loss, batch=(inputs[local], targets[local]))
            results["grad_norms"].append(monitor.latest()["grad_norm"])
            if step == 0:  # every rank sketches here: the all-reduces match up
                results["grad_sketch"] = shared.sketcher.sketch_grads()
                results["param_sketch"] = parameter_sketch(shared.sketcher)
            optimizer.step()
        results["latest"] = monitor.latest()
        results["errors"] = monitor.estimator_errors
        results["notes"] = dict(shared.notes)
        results["dominant"] = shared.dominant.basis()
        monitor.close()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()


def _reference() -> dict[str, Any]:
    """The same training in one process on the whole batch, unsharded."""
    model = _model()
    sketcher = GradientSketcher(ParameterSet.from_model(model), dim=DIM, seed=SEED)
    updates = UpdateRatioTracker(sketcher.parameters, every=_config().update_ratio_interval)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    inputs, targets = _data()
    out: dict[str, Any] = {"grad_norms": []}
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        _, ratio = updates.observe(step)
        if ratio is not None:
            out["update_ratio"] = ratio
        grads = [p.grad for p in model.parameters()]
        out["grad_norms"].append(float(torch.cat([g.double().flatten() for g in grads]).norm()))
        if step == 0:
            out["grad_sketch"] = sketcher.sketch(grads)
            out["param_sketch"] = parameter_sketch(sketcher)
        optimizer.step()
    return out


def test_fsdp_shards_sketch_and_norm_like_the_full_gradient(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    reference = _reference()

    # Shard offsets: rank 1's rows start where rank 0's end, in the flattened parameter.
    assert ranks[0]["offsets"]["0.weight"] == (0, 4 * 6)
    assert ranks[1]["offsets"]["0.weight"] == (4 * 6, 3 * 6)
    assert ranks[1]["offsets"]["2.bias"] == (2, 1)

    # FSDP averages two half-batch mean gradients where the reference takes one full-batch
    # mean: the same float32 terms summed in another order, a few ulps apart per entry;
    # 1e-5 of the norm bounds that with room, and 8 SGD steps keep it within it.
    sketch_tolerance = 1e-5 * float(reference["grad_sketch"].norm())
    for rank, result in enumerate(ranks):
        assert (result["grad_sketch"] - reference["grad_sketch"]).abs().max() <= (
            sketch_tolerance), rank
        # Parameter values are identical at step 0; only the bucket sums' order differs.
        assert torch.allclose(result["param_sketch"], reference["param_sketch"],
                              rtol=0, atol=1e-12 * float(reference["param_sketch"].norm()))
        for measured, expected in zip(result["grad_norms"], reference["grad_norms"],
                                      strict=True):
            assert measured == pytest.approx(expected, rel=1e-5)
        assert result["errors"] == {}
        for name in WHOLE_PARAMETER_ESTIMATORS:
            assert result["notes"][f"{name}.skipped"] == "parameters sharded"

    # The sketch-based estimators ran from all-reduced sketches: the same on every rank
    # (the loss and the monitor's timings are each rank's own).
    latest = ranks[0]["latest"]
    for key in SAME_ON_EVERY_RANK:
        assert latest[key] == ranks[1]["latest"][key], key
    assert torch.equal(ranks[0]["dominant"], ranks[1]["dominant"])
    # The update is a difference of weights that agree to float32 rounding (~1e-7 of
    # |theta|) while |update| is ~1e-2 of |theta|: ~1e-5 relative, bounded by 1e-4.
    assert latest["update_to_weight_ratio"] == pytest.approx(reference["update_ratio"],
                                                             rel=1e-4)
    assert not any(key.startswith(("sharpness", "fisher", "probe_", "gradient_noise"))
                   for key in latest)
