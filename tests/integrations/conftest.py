"""Settings of the integration tests: Hugging Face offline, one torch thread (the `server`
fixture comes from tests/conftest.py)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


