"""Representation ranks against numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from estimator_models import call

from raresignal.agent.estimators.representation import capture_features, representation_stats


def test_ranks_match_numpy() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 5)) @ rng.normal(size=(5, 20)) * rng.uniform(0.5, 2, 20)
    features[:, :3] = 0.0  # three dead units
    s = np.linalg.svd(features, compute_uv=False)
    p = s[s > 0] / s.sum()
    stats = representation_stats(torch.tensor(features), dormant_threshold=0.025)
    # float64 throughout: agreement to rounding.
    assert stats.effective_rank == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert stats.stable_rank == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-9)
    assert stats.dormant_fraction == pytest.approx(3 / 20)


def test_features_come_from_the_named_layer(mlp, classification_batch) -> None:
    x, _ = classification_batch
    mlp.eval()
    features = capture_features(mlp, "encoder.1", lambda: call(mlp, x))
    torch.testing.assert_close(features, torch.tanh(mlp.encoder[0](x)))
    with pytest.raises(ValueError, match="no layer named 'missing'"):
        capture_features(mlp, "missing", lambda: call(mlp, x))
