"""The embedded default data set: scikit-learn's bundled copy of the UCI digits.

1797 real 8x8 handwritten digits shipped inside scikit-learn (no download). Pixels (0..16)
are scaled to [0, 1]; batches keep the data set's order and drop the incomplete last batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1797 digits: inputs ``(1797, 64)`` in [0, 1] and integer labels ``(1797,)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data / 16.0, dtype=dtype)
    y = torch.as_tensor(data.target, dtype=torch.long)
    return x, y


def split_batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Consecutive batches of ``batch_size`` samples; the incomplete last batch is dropped."""
    if not isinstance(batch_size, int) or not 1 <= batch_size <= len(x):
        raise ValueError(
            f"batch_size={batch_size!r} is not allowed; it must be an int in [1, {len(x)}]"
        )
    m = len(x) // batch_size
    return [
        (x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size])
        for i in range(m)
    ]
