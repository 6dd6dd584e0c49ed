"""Data through Hugging Face datasets: embedded digits, local files, offline hub, mnist1d."""

from __future__ import annotations

import re
import time

import datasets
import numpy as np
import pytest
import torch

from noisemem.studies.data import prepare, split_batches
from noisemem.studies.models import SmallCNN, build_model


def test_digits_are_the_real_embedded_images():
    x, y, info = prepare("digits")
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert x.shape == (1797, 64) and info.num_classes == 10 and info.image_shape == (8, 8)
    assert info.scale == 16.0 and float(x.max()) == 1.0
    assert np.allclose(x.numpy() * 16.0, raw.data) and np.array_equal(y.numpy(), raw.target)


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow", "save_to_disk"])
def test_local_files_load_like_the_original(tmp_path, kind):
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {
            "a": rng.normal(size=40).tolist(),
            "b": rng.normal(size=40).tolist(),
            "label": (np.arange(40) % 3).tolist(),
        }
    )
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        ds.to_csv(str(path), index=False)
    elif kind == "arrow":
        folder = tmp_path / "arrow"
        ds.save_to_disk(str(folder))
        path = next(folder.glob("*.arrow"))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    x, y, info = prepare(str(path), normalize="none", limit=30)
    assert x.shape == (30, 2) and info.num_classes == 3 and info.limit == 30
    assert np.allclose(x[:, 0].numpy(), np.asarray(ds["a"][:30], dtype=np.float32))
    assert np.array_equal(y.numpy(), np.arange(30) % 3)


def test_standardize_records_and_applies():
    x, _, info = prepare("digits", normalize="standardize", limit=500)
    assert info.normalize == "standardize" and x.shape == (500, 64)
    nonconstant = x.std(0) > 0
    assert torch.allclose(x.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(
        x.std(0, unbiased=False)[nonconstant], torch.ones(int(nonconstant.sum())), atol=1e-4
    )


def test_hub_name_fails_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        prepare("hub:mnist")
    assert time.perf_counter() - t0 < 10
    assert "data.source='hub:mnist'" in str(err.value) and "save_to_disk" in str(err.value)


def test_mnist1d_is_generated_locally():
    x, y, info = prepare("mnist1d", limit=1000)
    assert x.shape == (1000, 40) and info.num_classes == 10 and set(y.tolist()) == set(range(10))


def test_models_build_and_run():
    x, _, info = prepare("digits", limit=8)
    cnn = build_model("cnn", inputs=64, classes=10, image_shape=info.image_shape)
    assert isinstance(cnn, SmallCNN) and cnn(x).shape == (8, 10)
    custom = build_model(
        "torch.nn:Linear", inputs=64, classes=10, kwargs={"in_features": 64, "out_features": 10}
    )
    assert custom(x).shape == (8, 10)
    with pytest.raises(ValueError, match=re.escape("model.kind='nowhere.module:Net'")):
        build_model("nowhere.module:Net", inputs=64, classes=10)


def test_split_drops_the_partial_batch_and_names_bad_sizes():
    x, y, _ = prepare("digits")
    batches = split_batches(x, y, 32)
    assert len(batches) == 56 and all(len(b[0]) == 32 for b in batches)
    with pytest.raises(ValueError, match="batch_size=2000"):
        split_batches(x, y, 2000)
    with pytest.raises(ValueError, match="batch_size=True"):
        split_batches(x, y, True)


def test_synthetic_cifar_is_cifar_shaped_reproducible_and_learnable():
    x, y, info = prepare("synthetic:cifar10", limit=512, normalize="none")
    again, y2, _ = prepare("synthetic:cifar10", limit=512, normalize="none")
    assert x.shape == (512, 3 * 32 * 32) and info.image_shape == (3, 32, 32)
    assert info.num_classes == 10 and torch.equal(x, again) and torch.equal(y, y2)
    other, _, _ = prepare("synthetic:cifar10", limit=512, normalize="none", seed=1)
    assert not torch.equal(x, other)
    counts = np.bincount(y.numpy(), minlength=10)
    assert counts.min() > 512 / 10 / 2  # every class is there, about equally
    # a class is its pattern plus noise: nearest class mean classifies far above chance
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    guess = torch.cdist(x, means).argmin(1)
    assert float((guess == y).float().mean()) > 0.9


def test_images_given_height_width_channels_are_made_channels_first(tmp_path):
    """PIL-like images (H, W, C), as the Hub's CIFAR-10 gives them, reach the models as
    (C, H, W): the flat inputs are the channel-first image."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 5, 3)).astype(np.float32)  # H=8, W=5, C=3
    path = tmp_path / "img"
    datasets.Dataset.from_dict({"img": list(images), "label": [0, 1, 2, 0, 1, 2]}).save_to_disk(
        str(path)
    )
    x, _, info = prepare(str(path), normalize="none")
    assert info.image_shape == (3, 8, 5)
    assert np.allclose(x.numpy(), images.transpose(0, 3, 1, 2).reshape(6, -1))


def test_resnet18_is_the_cifar_resnet18():
    from noisemem.studies.models import ResNet18

    model = ResNet18()
    # conv3x3 stem, stages of 2 basic blocks at 64..512, 1x1 shortcuts where the shape
    # changes, 2 parameters per channel of each norm layer, a 512 x 10 head
    w = [64, 128, 256, 512]
    convs = 3 * 64 * 9 + sum(
        (cin * cout * 9 + cout * cout * 9)
        + (cout * cout * 9) * 2
        + (cin * cout if cin != cout else 0)
        for cin, cout in zip([64, *w[:-1]], w, strict=True)
    )
    norms = 2 * (64 + sum(4 * c + (c if c != 64 else 0) for c in w))
    assert sum(p.numel() for p in model.parameters()) == convs + norms + 512 * 10 + 10
    assert convs + norms + 5130 == 11_173_962  # the CIFAR ResNet-18 count
    out = model(torch.randn(2, 3 * 32 * 32))
    assert out.shape == (2, 10)
    # each sample's output depends on that sample alone (GroupNorm, no batch statistics)
    x = torch.randn(3, 3 * 32 * 32)
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-6)
