"""End to end: a real Ray head (`ray start --head`), `ray job submit jobs/run_study.py`, and
the store it leaves, checked row by row."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from noisemem.store import SCHEMAS, load

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SPEC = """
name = "e2e"
output = "{output}"
seed = 3

[data]
source = "digits"
limit = 256

[model]
kind = "softmax"

[[optimizers]]
kind = "HeavyBall"
lr = 0.1
beta = 0.8

[[optimizers]]
kind = "AdamW"
lr = 0.001
beta1 = 0.9
beta2 = 0.999
eps = 1e-8

[training]
batch_size = 32
epochs = 2
permutations = 24
chunk_size = 6

[probes]
init = true
epoch_end = true

[runtime]
actors = 2
dtype = "float64"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    temp = tempfile.mkdtemp(prefix="nmhead", dir="/tmp")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_TMPDIR": temp,
        "TMPDIR": temp,
        "RAY_AUTH_MODE": "disabled",  # a throwaway head on loopback only
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    dashboard = free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--num-cpus=2",
        f"--port={free_port()}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield env, f"http://127.0.0.1:{dashboard}", Path(temp)
    finally:
        subprocess.run(
            [str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120
        )
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_writes_a_complete_store(ray_head):
    env, address, temp = ray_head
    output = temp / "store"
    spec = temp / "e2e.toml"
    spec.write_text(SPEC.format(output=output))
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={ROOT}",
        "--",
        sys.executable,
        "jobs/run_study.py",
        str(spec),
    ]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "permutations 48/48" in done.stdout
    assert f"store: {output}" in done.stdout

    t = load(str(output))
    assert t.manifest["complete"] is True
    for name, schema in SCHEMAS.items():
        assert list(t[name].columns) == schema.names
    configs = [c["id"] for c in t.manifest["configs"]]
    # every expected row, once
    assert len(t.runs) == 2 * 24 and not t.runs.duplicated(["config", "permutation"]).any()
    assert set(t.runs["status"]) == {"ok"}
    m = 256 // 32
    probe_steps = {m - 1, 2 * m - 1}
    keys = ["config", "permutation", "probe", "step"]
    assert len(t.corrections) == 2 * 24 * 2 * 2 and not t.corrections.duplicated(keys).any()
    assert set(t.corrections["step"]) == probe_steps
    assert (
        len(t.moments) == 2 * 2 * 2 * 4
        and not t.moments.duplicated(["config", "probe", "step", "chunk"]).any()
    )
    assert len(t.steps) == 2 * 24 * 2 * m
    # heavy ball: the Monte Carlo E[M] against the exact expectation written beside it.
    # Projection on the full-batch prediction fb: mean_p <M_p, fb>/|fb|^2 is the projection of
    # the Monte Carlo mean, its standard error the runs' std / sqrt(P); 4 standard errors.
    heavy = configs[0]
    for step in probe_steps:
        c = t.corrections
        proj = c[(c["config"] == heavy) & (c["probe"] == "init") & (c["step"] == step)][
            "proj_full_batch"
        ]
        p = t.predictions
        sel = (p["config"] == heavy) & (p["probe"] == "init") & (p["step"] == step)
        exact = np.asarray(p[sel & (p["kind"] == "exact_mean")].iloc[0]["vector"])
        fb = np.asarray(p[sel & (p["kind"] == "full_batch")].iloc[0]["vector"])
        exact_proj = exact @ fb / (fb @ fb)
        se = proj.std(ddof=1) / np.sqrt(len(proj))
        assert len(proj) == 24 and se > 0
        assert abs(proj.mean() - exact_proj) < 4 * se
