"""Every engine path and a study chunk on CUDA tensors agree with the CPU (float64).

The outputs are gathered by one function for a given device, so the CPU run below checks
that the comparison itself runs and is deterministic; the CUDA test needs a GPU and skips
without one.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny, rel_err
from test_chunk import small_spec
from test_correction import OPTIMIZERS, SEQUENCES
from torch import Tensor

import noisemem.fused as fused
import noisemem.window as windows
from noisemem import (
    expected_correction,
    full_batch_correction,
    memory_correction,
    noise_regularizer,
    trajectories,
)
from noisemem.correction import correction_at
from noisemem.ensemble import EnsembleProbe
from noisemem.probe import Probe
from noisemem.problem import Problem
from noisemem.studies.chunk import Context, predictions, run_chunk
from noisemem.studies.data import prepare

NUMERIC_COLUMNS = ("norm", "linf", "full_batch_norm", "proj_full_batch", "cos_full_batch")


def engine_outputs(device: str) -> dict[str, Tensor]:
    """Every public engine result for the tiny GELU MLP on ``device``, flat, by name."""
    tiny = make_tiny("gelu_mlp")
    model = tiny.model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in tiny.batches]
    loss_fn = tiny.loss_fn
    seq = SEQUENCES["two_epochs"]
    out: dict[str, Tensor] = {}
    for name, opt in OPTIMIZERS.items():
        out[f"M/{name}"] = memory_correction(model, loss_fn, batches, opt, seq)
        out[f"M/{name}/vmap"] = memory_correction(model, loss_fn, batches, opt, seq, hvp="vmap")
        for step in (None, 3):
            out[f"full_batch/{name}/{step}"] = full_batch_correction(
                model, loss_fn, batches, opt, step=step
            )
    for name in ("heavy_ball", "adamw_eps_in_sqrt"):  # the streamed window (many batches)
        opt = OPTIMIZERS[name]
        out[f"M/{name}/streamed"] = memory_correction(
            model, loss_fn, batches, opt, seq, window="streamed"
        )
    for name in ("heavy_ball", "nesterov"):
        for sampling in ("permute", "reshuffle", "replacement"):
            e = expected_correction(
                model, loss_fn, batches, OPTIMIZERS[name], epochs=2, sampling=sampling
            )
            assert e.full_batch_part is not None and e.noise_part is not None
            out[f"E/{name}/{sampling}"] = e.mean
            out[f"E/{name}/{sampling}/full_batch_part"] = e.full_batch_part
            out[f"E/{name}/{sampling}/noise_part"] = e.noise_part
    mc = expected_correction(
        model,
        loss_fn,
        batches,
        OPTIMIZERS["adamw_eps_in_sqrt"],
        epochs=2,
        method="monte_carlo",
        permutations=4,
    )
    assert mc.stderr is not None
    out["E/adamw/monte_carlo"], out["E/adamw/monte_carlo/stderr"] = mc.mean, mc.stderr
    for per_sample in (False, True):
        value, grad = noise_regularizer(model, loss_fn, batches, per_sample=per_sample)
        out[f"noise/{per_sample}/value"] = torch.tensor([value], dtype=torch.float64)
        out[f"noise/{per_sample}/grad"] = grad
    for name in ("heavy_ball", "adamw_eps_in_sqrt"):
        t = trajectories(model, loss_fn, batches, OPTIMIZERS[name], seq)
        out[f"trajectory/{name}/second_order"] = t.second_order.thetas.flatten()
        out[f"trajectory/{name}/linf_second"] = t.linf_second
    tiny.model.to("cpu")
    return out


def study_outputs(device: str) -> dict[str, Tensor]:
    """A chunk's numeric columns and moments and the predictions of a small float64 study."""
    spec = small_spec()
    ctx = Context.build(spec, *prepare("digits", limit=96), device)
    out: dict[str, Tensor] = {}
    for ci, config in enumerate(spec.configs):
        tables = run_chunk(ctx, config, 0)
        for r, row in enumerate(tables["corrections"]):
            values = [row[c] for c in NUMERIC_COLUMNS]
            out[f"study/{ci}/corrections/{r}"] = torch.tensor(values, dtype=torch.float64)
        for r, row in enumerate(tables["moments"]):
            out[f"study/{ci}/moments/{r}/mean"] = torch.tensor(row["mean"], dtype=torch.float64)
            out[f"study/{ci}/moments/{r}/m2"] = torch.tensor(row["m2"], dtype=torch.float64)
        for r, row in enumerate(predictions(ctx, config)):
            out[f"study/{ci}/predictions/{r}"] = torch.tensor(row["vector"], dtype=torch.float64)
    return out


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].detach().cpu(), b[key].detach().cpu()
        finite = torch.isfinite(y)
        assert torch.equal(torch.isfinite(x), finite), key
        assert rel_err(x[finite], y[finite]) <= tol, (key, rel_err(x[finite], y[finite]))


def test_device_comparison_runs_on_cpu() -> None:
    """The harness of the CUDA test, on the CPU twice: every path runs and is repeatable."""
    first, second = engine_outputs("cpu"), engine_outputs("cpu")
    # per optimizer: 2 corrections + 2 full-batch; 2 streamed; 2 x 3 exact E (mean and
    # both parts); Monte Carlo mean and stderr; 2 x 2 noise; 2 x 2 trajectories
    assert len(first) == 4 * len(OPTIMIZERS) + 2 + 18 + 2 + 4 + 4
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in first.values())
    assert_same(first, second, 0.0)
    assert any(float(t.abs().max()) > 0 for t in first.values())
    study = study_outputs("cpu")
    assert len(study) > 10 and all(math.isfinite(float(t.norm())) for t in study.values())
    assert_same(study, study_outputs("cpu"), 0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_engine_path_and_a_study_chunk_match_on_cuda() -> None:
    cpu, gpu = engine_outputs("cpu"), engine_outputs("cuda")
    for key, t in gpu.items():
        if not key.startswith("noise/") or key.endswith("grad"):
            assert t.is_cuda, key
    assert_same(gpu, cpu, 1e-9)
    assert_same(study_outputs("cuda"), study_outputs("cpu"), 1e-9)


def scale_outputs(device: str) -> dict[str, Tensor]:
    """The paths of bounded memory and of the torch window on ``device``: the blocked scan
    (a GPU's default window), a linear optimizer's coefficients and scan without the fused
    kernel, the online window (O(L d)), graphs a batch at a time, the exact expectation a
    batch at a time, and the memory plan's own measurement."""
    from noisemem.budget import available_memory, plan_memory

    tiny = make_tiny("gelu_mlp")
    model = tiny.model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in tiny.batches]
    loss_fn = tiny.loss_fn
    seq = SEQUENCES["two_epochs"] + SEQUENCES["repeats"]
    out: dict[str, Tensor] = {}
    for name, opt in OPTIMIZERS.items():
        out[f"M/{name}/scan"] = memory_correction(model, loss_fn, batches, opt, seq, window="scan")
    for name in ("heavy_ball", "adamw_eps_in_sqrt", "lion_soft"):
        opt = OPTIMIZERS[name]
        for window in ("online", "auto"):
            out[f"M/{name}/{window}/grouped"] = memory_correction(
                model, loss_fn, batches, opt, seq, window=window, graph_batches=1
            )
        out[f"M/{name}/scan/vmap/grouped"] = memory_correction(
            model, loss_fn, batches, opt, seq, window="scan", hvp="vmap", graph_batches=3
        )
    for name in ("heavy_ball", "nesterov"):  # a linear optimizer's torch path, both ways
        for coefficients in (True, False):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(fused, "usable", lambda *_: False)  # as on a GPU
                patch.setattr(windows, "LINEAR_COEFFICIENTS", coefficients)
                out[f"M/{name}/torch/{coefficients}"] = memory_correction(
                    model, loss_fn, batches, OPTIMIZERS[name], seq
                )
    for sampling in ("permute", "reshuffle"):
        e = expected_correction(
            model, loss_fn, batches, OPTIMIZERS["heavy_ball"], epochs=2, sampling=sampling,
            graph_batches=1,
        )  # fmt: skip
        assert e.full_batch_part is not None and e.noise_part is not None
        out[f"E/heavy_ball/{sampling}/grouped"] = e.mean
        out[f"E/heavy_ball/{sampling}/grouped/noise_part"] = e.noise_part
    problem = Problem(model, loss_fn, batches)
    # the probes of a chunk's epoch ends taken together (what "auto" does on CUDA)
    d = problem.theta.numel()
    thetas = problem.theta + 0.1 * torch.linspace(-1, 1, 3 * d, dtype=problem.theta.dtype).to(
        device
    ).view(3, d)
    together = EnsembleProbe(problem, thetas)
    for name, opt in OPTIMIZERS.items():
        M = together.corrections(opt, [seq, seq[:5], seq[:2]])
        for p in range(3):
            out[f"ensemble/{name}/{p}"] = M[p]
    for kind, value in zip(("g", "Hg", "cov"), together.hessian_moments(), strict=True):
        out[f"ensemble/{kind}"] = value.flatten()
    plan = plan_memory(problem, OPTIMIZERS["adamw_eps_in_sqrt"], memory_budget="1GiB")
    # one batch's graph as measured on this device (saved tensors), the device's free memory
    assert plan.mode == "graph" and plan.graph_bytes_per_batch is not None
    assert plan.graph_bytes_per_batch > 0 and available_memory(problem.theta.device) > 0
    tiny.model.to("cpu")
    return out


def test_scale_paths_compare_on_cpu() -> None:
    """The harness of the CUDA test below on the CPU twice: every path runs, is repeatable,
    and the scan and the grouped graphs agree with the default path."""
    first, second = scale_outputs("cpu"), scale_outputs("cpu")
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in first.values())
    assert_same(first, second, 0.0)
    tiny = make_tiny("gelu_mlp")
    seq = SEQUENCES["two_epochs"] + SEQUENCES["repeats"]
    for name, opt in OPTIMIZERS.items():
        default = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, seq)
        assert rel_err(first[f"M/{name}/scan"], default) < 1e-9
        keys = [f"M/{name}/online/grouped", f"M/{name}/auto/grouped"]
        keys += [f"M/{name}/torch/{coefficients}" for coefficients in (True, False)]
        for key in keys:
            if key in first:
                assert rel_err(first[key], default) < 1e-9
    problem = Problem(tiny.model, tiny.loss_fn, tiny.batches)
    d = problem.theta.numel()
    thetas = problem.theta + 0.1 * torch.linspace(-1, 1, 3 * d, dtype=torch.float64).view(3, d)
    for name, opt in OPTIMIZERS.items():
        for p, s in enumerate((seq, seq[:5], seq[:2])):
            one = Probe(problem.at(thetas[p]))
            assert rel_err(first[f"ensemble/{name}/{p}"], correction_at(one, opt, s)) < 1e-9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scale_paths_match_on_cuda() -> None:
    """On CUDA the scan's blocks are cumulative sums (matrix products on the CPU), the plan
    reads the device's free memory, and every grouped or online path must give the CPU's
    numbers."""
    cpu, gpu = scale_outputs("cpu"), scale_outputs("cuda")
    assert all(t.is_cuda for t in gpu.values())
    assert_same(gpu, cpu, 1e-9)
