"""The mini-batch variance regularizer (THEORY §5, paper Sec. 6.2).

    R(theta)      = E_i ||g_i(theta) - g(theta)||^2 = mean_i ||g_i||^2 - ||g||^2
    grad R(theta) = 2 Cov,   Cov = (1/m) sum_i (H_i - H)(g_i - g) = mean_i H_i g_i - H g

The mean is over the m batches (biased, 1/m, not 1/(m-1): it is the expectation over a
uniformly drawn batch). ``per_sample=True`` uses the per-sample gradients instead (each
sample a batch of one), the analogue that enters reshuffled sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.func import grad_and_value

from noisemem import checks
from noisemem.problem import Batch, LossFn, Problem, as_problem


def variance(problem: Problem, theta: Tensor) -> Tensor:
    """``R(theta) = mean_i ||g_i||^2 - ||g||^2`` with ``g = mean_i g_i``."""
    G = problem.batch_grads(theta)  # (m, d)
    return (G * G).sum(1).mean() - (G.mean(0) ** 2).sum()


def noise_regularizer(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    per_sample: bool = False,
) -> tuple[float, Tensor]:
    """``(R, grad R)`` at the model's current parameters; ``grad R`` is flat ``(d,)``."""
    checks.flag("per_sample", per_sample)
    problem = as_problem(model, loss_fn, batches)
    if per_sample:
        problem = problem.per_sample()
    g, value = grad_and_value(lambda t: variance(problem, t))(problem.theta)
    return float(value), g.detach()
