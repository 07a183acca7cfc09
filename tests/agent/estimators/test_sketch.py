"""CountSketch: unbiased inner products within the JL error, shards that add up."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from raresignal.agent.estimators.parameters import ParameterSet
from raresignal.agent.estimators.sketch import GradientSketcher, bucket_and_sign


def _sketcher(dim: int = 2048, seed: int = 0) -> tuple[GradientSketcher, ParameterSet]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 30))
    params = ParameterSet.from_model(model)
    return GradientSketcher(params, dim, seed), params


def test_inner_products_within_the_jl_error() -> None:
    sketcher, params = _sketcher()
    generator = torch.Generator().manual_seed(3)
    d = sketcher.dim
    worst = 0.0
    for _ in range(40):
        x = torch.randn(params.numel, generator=generator)
        y = 0.5 * x + torch.randn(params.numel, generator=generator)
        sx, sy = (sketcher.sketch(params.unflatten(v)) for v in (x, y))
        # CountSketch is unbiased with Var<Sx,Sy> <= 2|x|^2|y|^2/d; 5 standard deviations
        # bound every one of 40 pairs except with probability far below 1e-4.
        sigma = math.sqrt(2.0 / d) * float(x.norm() * y.norm())
        error = abs(float(sx @ sy) - float(x @ y))
        assert error <= 5 * sigma
        worst = max(worst, error / sigma)
    assert worst > 0.0  # the sketch is a real projection, not the identity


def test_shard_projections_sum_to_the_whole() -> None:
    sketcher, params = _sketcher()
    name, weight = params.names[0], params.params[0]
    flat = torch.randn(weight.numel())
    whole = sketcher.sketch_tensor(name, flat.view_as(weight))
    cuts = [0, 7, 600, 1111, flat.numel()]
    shards = sum(sketcher.sketch_tensor(name, flat[a:b], offset=a)
                 for a, b in itertools.pairwise(cuts))
    # Every coordinate lands in the same bucket with the same sign in both: only fp32
    # summation order differs (a few ulps of the bucket sums).
    torch.testing.assert_close(shards, whole, rtol=1e-5, atol=1e-5)


def test_batched_matches_one_at_a_time_and_accumulates_in_fp32() -> None:
    sketcher, params = _sketcher(dim=256)
    batch = [torch.randn(3, *p.shape) for p in params.params]
    together = sketcher.sketch_batched(batch)
    for i in range(3):
        alone = sketcher.sketch([t[i] for t in batch])
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
    half = sketcher.sketch([t[0].to(torch.bfloat16) for t in batch])
    assert half.dtype == torch.float32
    # bf16 inputs keep 8 mantissa bits: each entry moves by at most 2^-8 relative.
    exact = sketcher.sketch([t[0].to(torch.bfloat16).float() for t in batch])
    torch.testing.assert_close(half, exact, rtol=1e-5, atol=1e-5)


def test_hash_depends_on_name_seed_and_global_index_only() -> None:
    b1, s1 = bucket_and_sign("encoder.0.weight", 500, 64, seed=1)
    b2, s2 = bucket_and_sign("module.encoder.0.weight", 500, 64, seed=1)  # DDP-wrapped name
    assert torch.equal(b1, b2) and torch.equal(s1, s2)
    b3, _ = bucket_and_sign("encoder.0.weight", 500, 64, seed=2)
    assert not torch.equal(b1, b3)
    tail, tail_sign = bucket_and_sign("encoder.0.weight", 100, 64, seed=1, offset=400)
    assert torch.equal(tail, b1[400:]) and torch.equal(tail_sign, s1[400:])
    assert b1.dtype == torch.int32 and s1.dtype == torch.int8
    assert set(s1.tolist()) == {-1, 1}
    # Buckets are near uniform: 500 draws into 64 buckets, no bucket above 5x its share.
    assert int(torch.bincount(b1.long(), minlength=64).max()) < 5 * 500 / 64


def test_grad_sketch_reads_dot_grad() -> None:
    sketcher, params = _sketcher(dim=128)
    for p in params.params:
        p.grad = torch.randn_like(p)
    torch.testing.assert_close(sketcher.sketch_grads(), sketcher.sketch(params.grads()))
    assert float(sketcher.sketch_grads().norm()) > 0
