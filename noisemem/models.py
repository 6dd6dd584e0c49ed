"""Models of the paper's experiments, as ordinary ``nn.Module``s."""

from __future__ import annotations

from torch import nn


def gelu_mlp(inputs: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    """The MLP with GELU activation of the paper's Figure 1: inputs-hidden-GELU-classes."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, classes))


def softmax_regression(inputs: int = 64, classes: int = 10) -> nn.Module:
    """Multinomial logistic regression: one linear layer (use with cross-entropy)."""
    return nn.Linear(inputs, classes)
