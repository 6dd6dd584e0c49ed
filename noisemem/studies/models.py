"""Models of the paper's experiments, as ordinary ``nn.Module``s, and the spec's builder.

Every model takes flat inputs ``(batch, features)``; the convolutional ones reshape them to
images ``(channels, height, width)`` (the data set's ``image_shape``; a square
single-channel image when it gives none). No model has batch norm: every sample's loss
must depend on that sample alone (the exact reshuffle expectation and the per-batch
functional calls need it), so the ResNet normalises with GroupNorm.
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


def _image_shape(kind: str, inputs: int, image_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """``(channels, height, width)`` of the inputs: the data set's shape, else a square of
    one channel, else a square of three (RGB)."""
    if image_shape is None:
        for channels in (1, 3):
            side = math.isqrt(inputs // channels)
            if channels * side * side == inputs:
                return (channels, side, side)
        raise ValueError(
            f"model.kind={kind!r} needs image inputs; {inputs} features are not a square "
            "image and the data set gives no image shape"
        )
    return tuple(image_shape) if len(image_shape) == 3 else (1, *image_shape[-2:])


def _width(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.kwargs.{name}={value!r} is not allowed; use an int >= 1")
    return value


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
        channels = _width("channels", channels)
        self.image_shape = _image_shape("cnn", inputs, image_shape)
        self.features = nn.Sequential(
            nn.Conv2d(self.image_shape[0], channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.GELU(),
        )
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.reshape(x.shape[0], *self.image_shape))  # (B, 2c, H, W)
        return self.head(h.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """ResNet's basic block: two conv3x3 with GroupNorm and GELU, and a shortcut (a conv1x1
    with GroupNorm when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.gelu(self.norm1(self.conv1(x)))
        return nn.functional.gelu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (the CIFAR variant: a conv3x3 stem, no max pool), four
    stages of two basic blocks at widths w, 2w, 4w, 8w, GroupNorm instead of batch norm
    (``groups`` per layer), global average pool, linear head. ``width=64`` is the standard
    11.2M-parameter network; a smaller width keeps the architecture at a fraction of the
    cost (the test twin uses 8)."""

    def __init__(
        self,
        inputs: int = 3072,
        classes: int = 10,
        width: int = 64,
        groups: int = 8,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        width, groups = _width("width", width), _width("groups", groups)
        if width % groups:
            raise ValueError(
                f"model.kwargs.groups={groups} is not allowed; it must divide the width ({width})"
            )
        self.image_shape = _image_shape("resnet18", inputs, image_shape)
        self.stem = nn.Sequential(
            nn.Conv2d(self.image_shape[0], width, 3, 1, 1, bias=False),
            nn.GroupNorm(groups, width),
            nn.GELU(),
        )
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for b in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if stage and not b else 1, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x.reshape(x.shape[0], *self.image_shape)))
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
    if kind == "resnet18":
        return ResNet18(inputs, classes, image_shape=image_shape, **kwargs)
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
