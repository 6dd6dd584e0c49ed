"""Corollary 3.3: memoryful vs memoryless trajectories scale like h^2 (second order), h (first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny

from noisemem import trajectories
from noisemem.optim import AdamW, HeavyBall
from noisemem.trajectory import memoryful_run

HORIZON = 0.8
STEP_SIZES = [0.04, 0.02, 0.01, 0.005]


def slopes(make_opt, full_batch: bool):
    tiny = make_tiny("gelu_mlp", num_batches=3, batch_size=4)
    batches = tiny.full if full_batch else tiny.batches
    first, second = [], []
    for h in STEP_SIZES:
        steps = round(HORIZON / h)
        seq = [j % len(batches) for j in range(steps)]
        tr = trajectories(tiny.model, tiny.loss_fn, batches, make_opt(h), seq)
        first.append(float(tr.linf_first.max()))
        second.append(float(tr.linf_second.max()))
    log_h = np.log(STEP_SIZES)
    return np.polyfit(log_h, np.log(first), 1)[0], np.polyfit(log_h, np.log(second), 1)[0]


CASES = {
    "heavy_ball": lambda h: HeavyBall(h, 0.5),
    "adamw_eps_in_sqrt": lambda h: AdamW(h, 0.5, 0.6, 0.1, weight_decay=0.05),
}


@pytest.mark.parametrize("full_batch", [True, False], ids=["full_batch", "mini_batch"])
@pytest.mark.parametrize("opt", sorted(CASES))
def test_linf_distance_slopes(opt, full_batch):
    s1, s2 = slopes(CASES[opt], full_batch)
    assert abs(s1 - 1) < 0.3, s1
    assert abs(s2 - 2) < 0.3, s2


def test_divergent_run_is_recorded_not_raised():
    """A quadratic loss with lr far beyond 2/lambda_max grows geometrically to inf/NaN."""
    tiny = make_tiny("softmax")

    def quadratic(out, y):
        return (out**2).mean()

    run = memoryful_run(
        tiny.model, quadratic, tiny.batches, HeavyBall(1e3, 0.9), [0, 1, 2, 3] * 100
    )
    assert run.diverged_at is not None and 0 < run.diverged_at < 400
    assert bool(torch.isnan(run.thetas[run.diverged_at :]).all())
    assert bool(torch.isfinite(run.thetas[: run.diverged_at]).all())
