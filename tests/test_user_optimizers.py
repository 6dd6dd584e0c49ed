"""Optimizers defined outside noisemem (``user_optimizers``) get runs, Eq. (9) on every
window, Monte Carlo E[M], full-batch predictions and a study, with no edit inside noisemem."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from conftest import make_tiny, rel_err
from oracles import batch_gradient, literal_correction
from user_optimizers import RMSProp, SoftSignum

import noisemem.fused as fused
from noisemem import expected_correction, full_batch_correction, memory_correction
from noisemem.expectation import sample_run
from noisemem.full_batch import NoClosedForm
from noisemem.studies.driver import launch
from noisemem.studies.spec import SpecError, StudySpec
from noisemem.studies.tables import load
from noisemem.trajectory import memoryful_run

SEQUENCE = [2, 0, 3, 1, 1, 3, 0, 2, 1, 1]
USER = {"rmsprop": RMSProp(0.01, 0.9, 1e-3), "soft_signum": SoftSignum(0.01, 0.8, 1e-2)}


def test_rmsprop_runs_as_torch_optim_rmsprop(tiny):
    run = memoryful_run(tiny.model, tiny.loss_fn, tiny.batches, RMSProp(0.01, 0.9, 1e-3), SEQUENCE)
    model = copy.deepcopy(tiny.model)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3)
    for n, i in enumerate(SEQUENCE):
        x, y = tiny.batches[i]
        opt.zero_grad()
        tiny.loss_fn(model(x), y).backward()
        opt.step()
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        assert rel_err(run.thetas[n + 1], theta) < 1e-12, n


def test_soft_signum_runs_as_the_soft_sign_of_the_momentum(tiny):
    lr, beta, eps = 0.01, 0.8, 1e-2
    run = memoryful_run(tiny.model, tiny.loss_fn, tiny.batches, SoftSignum(lr, beta, eps), SEQUENCE)
    theta, m = tiny.theta, torch.zeros_like(tiny.theta)
    for n, i in enumerate(SEQUENCE):
        g = batch_gradient(tiny.model, tiny.loss_fn, theta.clone(), tiny.batches[i]).detach()
        m = beta * m + (1 - beta) * g
        theta = theta - lr * m / torch.sqrt(m * m + eps)
        assert rel_err(run.thetas[n + 1], theta) < 1e-12, n


@pytest.mark.parametrize("window", ["auto", "fused", "dense", "streamed"])
@pytest.mark.parametrize("name", sorted(USER))
def test_eq9_of_a_user_optimizer_on_every_window_matches_the_literal_jacobians(name, window):
    opt = USER[name]
    assert fused.form(opt) is not None  # its Phi's form puts it on the fused CPU kernel
    tiny = make_tiny("gelu_mlp")
    ours = memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, SEQUENCE, window=window)
    literal = literal_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, SEQUENCE, tiny.theta)
    assert float(literal.norm()) > 1e-6
    assert rel_err(ours, literal) < 1e-9


def test_the_linear_window_is_refused_with_the_reason():
    tiny = make_tiny("softmax")
    with pytest.raises(ValueError, match=r"window='linear'.*RMSProp is not linear"):
        memory_correction(
            tiny.model, tiny.loss_fn, tiny.batches, USER["rmsprop"], [0, 1], window="linear"
        )


@pytest.mark.parametrize("name", sorted(USER))
def test_monte_carlo_and_full_batch_predictions_of_a_user_optimizer(name):
    opt = USER[name]
    tiny = make_tiny("gelu_mlp")
    m = len(tiny.batches)
    mc = expected_correction(
        tiny.model, tiny.loss_fn, tiny.batches, opt, epochs=2, method="monte_carlo", permutations=4
    )
    orders = [sample_run("permute", m, 2, 2 * m, 0, p).sequence for p in range(4)]
    direct = torch.stack(
        [memory_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, s) for s in orders]
    )
    assert rel_err(mc.mean, direct.mean(0)) < 1e-12
    assert rel_err(mc.stderr, direct.std(0) / 2) < 1e-10  # ddof 1, over sqrt(4)
    # no closed form: the finite-n prediction is Eq. (9) on the full batch, every step
    fb = full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, opt, step=3)
    literal = literal_correction(tiny.model, tiny.loss_fn, tiny.full, opt, [0] * 4, tiny.theta)
    assert rel_err(fb, literal) < 1e-9
    with pytest.raises(NoClosedForm, match="no closed full-batch limit"):
        full_batch_correction(tiny.model, tiny.loss_fn, tiny.batches, opt)


def test_a_spec_names_an_optimizer_by_its_module():
    raw = {
        "name": "user",
        "output": "/tmp/noisemem-unused",
        "optimizers": [
            {"kind": "user_optimizers:RMSProp", "lr": 0.01, "alpha": [0.9, 0.99], "eps": 1e-3}
        ],
    }
    spec = StudySpec.from_dict(raw)
    assert [c.optimizer for c in spec.configs] == [
        RMSProp(0.01, 0.9, 1e-3),
        RMSProp(0.01, 0.99, 1e-3),
    ]
    assert spec.configs[1].id == "c001-RMSProp-lr0.01-alpha0.99-eps0.001"
    bad = [
        ({"kind": "user_optimizers:Nowhere"}, "optimizers[0].kind='user_optimizers:Nowhere'"),
        ({"kind": "user_optimizers:np"}, "subclass of noisemem.optim.Optimizer"),
        ({"kind": "user_optimizers:RMSProp", "lr": 0.1, "alpha": 1.5, "eps": 1e-3}, "alpha=1.5"),
        ({"kind": "user_optimizers:RMSProp", "lr": 0.1, "beta": 0.9}, "unknown field 'beta'"),
    ]
    for entry, needle in bad:
        with pytest.raises(SpecError) as err:
            StudySpec.from_dict({**raw, "optimizers": [entry]})
        assert needle in str(err.value)


def test_a_study_runs_each_user_optimizer_on_ray(ray_local, tmp_path):
    """The actors cannot import ``user_optimizers`` (it is on the test's path only): the
    driver ships the module by value. Every run finishes, and the predictions record that
    the full-batch limit has no closed form instead of failing."""
    raw = {
        "name": "user_study",
        "output": str(tmp_path / "store"),
        "data": {"source": "digits", "limit": 96},
        "model": {"kind": "gelu_mlp", "hidden": 4},
        "optimizers": [
            {"kind": "user_optimizers:RMSProp", "lr": 1e-3, "alpha": 0.99, "eps": 1e-6},
            {"kind": "user_optimizers:SoftSignum", "lr": 1e-3, "beta": 0.9, "eps": 1e-6},
        ],
        "training": {"batch_size": 32, "epochs": 2, "permutations": 4, "chunk_size": 2},
        "probes": {"init": True, "epoch_end": True},
        "runtime": {"dtype": "float64"},
    }
    path = launch(StudySpec.from_dict(raw), actors=2, log=io.StringIO()).wait(timeout=600)
    tables = load(path)
    assert len(tables.runs) == 2 * 4 and set(tables.runs["status"]) == {"ok"}
    assert set(tables.runs["optimizer"]) == {"RMSProp", "SoftSignum"}
    assert tables.manifest["complete"] is True
    kinds = tables.predictions.groupby("kind")
    limit = kinds.get_group("full_batch_limit")
    assert len(limit) == 2 and limit["vector"].isna().all() and limit["norm"].isna().all()
    full_batch = kinds.get_group("full_batch")
    assert len(full_batch) == 2 * 2 and np.isfinite(full_batch["norm"]).all()
    corrections = tables.corrections
    assert len(corrections) == 2 * 4 * 2 * 2  # configs x permutations x (init, epoch) x steps
    assert np.isfinite(corrections["cos_full_batch"]).all()
