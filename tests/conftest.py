"""Tiny float64 problems shared by the engine tests (3-5 batches, readable ids)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per test process: the workers share the machine's cores, and the
    # tiny problems gain nothing from threads that contend with the other worker
    torch.set_num_threads(1)


class Tiny:
    """A model, its loss and equal-size float64 batches."""

    def __init__(self, name: str, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.name = name
        self.model = model.double()
        self.loss_fn = nn.functional.cross_entropy
        self.batches = batches

    @property
    def theta(self) -> Tensor:
        return nn.utils.parameters_to_vector(self.model.parameters()).detach().clone()

    @property
    def full(self) -> list[tuple[Tensor, Tensor]]:
        """The whole data as one batch (the full loss is the mean over the batches)."""
        return [(torch.cat([x for x, _ in self.batches]), torch.cat([y for _, y in self.batches]))]


def make_tiny(name: str, num_batches: int = 4, batch_size: int = 2, seed: int = 0) -> Tiny:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "gelu_mlp":
        model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 3))
    elif name == "softmax":
        model = nn.Linear(3, 3)
    else:
        raise KeyError(name)
    batches = [
        (
            torch.randn(batch_size, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]
    return Tiny(name, model, batches)


@pytest.fixture(params=["gelu_mlp", "softmax"])
def tiny(request: pytest.FixtureRequest) -> Tiny:
    return make_tiny(request.param)


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| (0 when both vanish)."""
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray instance for the whole session (2 CPUs), temp files contained."""
    import shutil
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="nmray", dir="/tmp")  # short: Ray's socket paths are limited
    os.environ["RAY_TMPDIR"] = temp
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


class CountingModel(nn.Module):
    """Counts its forward calls: bad input must be refused before the model ever runs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x)
