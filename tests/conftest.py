"""Test-suite wide settings: offline, poisoned outputs, deterministic seeds."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Backends NaN-fill their outputs before a kernel runs, so unwritten elements show.
os.environ["HYBRID_KERNELS_POISON"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
