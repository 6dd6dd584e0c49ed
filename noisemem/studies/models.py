"""Models of the paper's experiments, as ordinary ``nn.Module``s, and the spec's builder.

Every model takes flat inputs ``(batch, features)``; the CNN reshapes them to images.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from noisemem.studies.spec import SpecError, StudySpec

if TYPE_CHECKING:
    from noisemem.studies.data import DataInfo


def gelu_mlp(inputs: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    """The MLP with GELU activation of the paper's Figure 1: inputs-hidden-GELU-classes."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, classes))


def softmax_regression(inputs: int = 64, classes: int = 10) -> nn.Module:
    """Multinomial logistic regression: one linear layer (use with cross-entropy)."""
    return nn.Linear(inputs, classes)


class SmallCNN(nn.Module):
    """conv3x3(1->c)-GELU-conv3x3(c->2c)-GELU-global average pool-linear, on flat inputs
    reshaped to ``image_shape`` (a square image when not given)."""

    def __init__(
        self,
        inputs: int = 64,
        classes: int = 10,
        channels: int = 8,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"model.kwargs.channels={channels!r} is not allowed; use an int >= 1")
        if image_shape is None:
            side = math.isqrt(inputs)
            if side * side != inputs:
                raise ValueError(
                    f"model.kind='cnn' needs image inputs; {inputs} features are not a square "
                    "image and the data set gives no image shape"
                )
            image_shape = (side, side)
        self.image_shape = tuple(image_shape[-2:])
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.GELU(),
        )
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.reshape(x.shape[0], 1, *self.image_shape))  # (B, 2c, H, W)
        return self.head(h.mean(dim=(2, 3)))


def build_model(
    kind: str,
    *,
    inputs: int,
    classes: int,
    hidden: int = 128,
    image_shape: tuple[int, ...] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The spec's model: a built-in kind or ``package.module:Factory`` called with kwargs
    (plus ``inputs`` and ``classes`` when the factory accepts them)."""
    kwargs = dict(kwargs or {})
    if kind in ("gelu_mlp", "softmax") and kwargs:
        raise ValueError(
            f"model.kwargs={kwargs!r} is not allowed for model.kind={kind!r}; it takes none "
            "(set model.hidden for the MLP's width)"
        )
    if kind == "gelu_mlp":
        return gelu_mlp(inputs, hidden, classes)
    if kind == "softmax":
        return softmax_regression(inputs, classes)
    if kind == "cnn":
        return SmallCNN(inputs, classes, image_shape=image_shape, **kwargs)
    module_name, _, attr = kind.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model.kind={kind!r} cannot be imported: {err}") from err
    try:
        model = factory(**kwargs)
    except TypeError:
        model = factory(inputs=inputs, classes=classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.kind={kind!r} returned {type(model).__name__}, not an nn.Module")
    return model


def initial_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise ``model`` reproducibly from ``seed`` (every module's reset_parameters)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    torch.random.set_rng_state(gen_state)
    return model


def spec_model(spec: StudySpec, info: DataInfo) -> nn.Module:
    """The spec's model for this data (inputs, classes and image shape from ``info``)."""
    return build_model(
        spec.model.kind,
        inputs=info.num_features,
        classes=info.num_classes,
        hidden=spec.model.hidden,
        image_shape=info.image_shape,
        kwargs=spec.model.kwargs,
    )


def check_model(spec: StudySpec, info: DataInfo) -> None:
    """Build the spec's model once on the CPU, so that a bad model fails before any actor."""
    try:
        spec_model(spec, info)
    except TypeError as err:
        raise SpecError(
            f"model.kwargs={dict(spec.model.kwargs)!r} do not fit model.kind="
            f"{spec.model.kind!r}: {err}"
        ) from err
    except ValueError as err:
        raise SpecError(str(err)) from err
