"""Corollary 3.3: memoryful vs memoryless trajectories scale like h^2 (second order), h (first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny

from noisemem import trajectories
from noisemem.optim import AdamW, HeavyBall, Lion
from noisemem.trajectory import memoryful_run, memoryless_run

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


class CountingLoss:
    """A loss that counts its calls: refused input must not reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("sign_lion", "eps > 0"),
        ("index", "sequence[2]=9"),
        ("optimizer", "optimizer="),
    ],
)
def test_trajectories_refuse_bad_input_before_the_first_run(case, needle):
    tiny = make_tiny("softmax")
    loss = CountingLoss()
    opt, seq = HeavyBall(0.1, 0.5), [0, 1, 2, 3] * 50
    if case == "sign_lion":
        opt = Lion(0.01, 0.9, 0.99)  # runs fine; Eq. (9) needs the soft sign
    elif case == "index":
        seq = [0, 1, 9]
    else:
        opt = torch.optim.SGD(tiny.model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as err:
        trajectories(tiny.model, loss, tiny.batches, opt, seq)
    assert needle in str(err.value) and loss.calls == 0


@pytest.mark.parametrize("order", [0, 3, True, 2.0])
def test_memoryless_order_must_be_one_or_two(order):
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError, match=f"order={order!r}"):
        memoryless_run(
            tiny.model, tiny.loss_fn, tiny.batches, HeavyBall(0.1, 0.5), [0, 1], order=order
        )
