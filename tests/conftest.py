"""Shared fixtures: hand-built planted models, and few threads per test (helpers live in helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch
from planted import PlantedNet, planted_data


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # CI has 2 cores: 2 threads, unless OMP_NUM_THREADS says otherwise (on a loaded
    # machine 2 spinning OpenMP threads per process run many times slower).
    n = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(n) if n.isdigit() and int(n) > 0 else 2)


@pytest.fixture()
def planted() -> tuple[PlantedNet, torch.Tensor]:
    model = PlantedNet()
    return model, planted_data(model)
