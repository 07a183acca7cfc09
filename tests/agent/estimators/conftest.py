"""Fixtures for the estimator tests: the small models of ``estimator_models`` and data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from estimator_models import MLP, TinyTransformer


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def classification_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 10, generator=generator)
    y = torch.randint(0, 4, (32,), generator=generator)
    return x, y


@pytest.fixture
def transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


@pytest.fixture
def lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 7, (8, 6), generator=generator)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :2] = -100
    return tokens, targets
