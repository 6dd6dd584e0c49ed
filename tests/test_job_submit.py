"""End to end: a real Ray head (`ray start --head`), `ray job submit jobs/run_study.py`, and
the store it leaves, checked row by row."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from noisemem.studies.schema import SCHEMAS
from noisemem.studies.tables import load

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


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie is gone already
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(root: int) -> set[int]:
    parents = process_parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def mentioning(text: str) -> set[int]:
    """Processes whose command line names ``text`` (this head's unique temp dir)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.add(int(cmdline.parent.name))
        except OSError:
            continue
    return found - {os.getpid()}


def signal_each(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def alive(pids: set[int]) -> set[int]:
    return pids & set(process_parents())


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_head(head: subprocess.Popen, temp: str) -> set[int]:
    """Stop the head this test started, and only it. SIGTERM to `ray start --block` makes it
    stop the services it started; whatever is left is then signalled by pid: its process
    group, every process descending from it (workers, which the raylet puts in their own
    groups; the job driver, in its own session) and any process whose command line names
    this head's temp dir. Other Ray instances on the machine are untouched. Returns the
    pids still alive afterwards (none)."""
    pids = descendants(head.pid) | mentioning(temp)
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    kill_group(head.pid, signal.SIGTERM)
    signal_each(alive(pids), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pids | {head.pid}):
        time.sleep(0.2)
    kill_group(head.pid, signal.SIGKILL)
    signal_each(alive(pids), signal.SIGKILL)
    head.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pids):
        time.sleep(0.1)
    return alive(pids)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_head(
    head: subprocess.Popen, address: str, agent_port: int, log: Path, timeout: float
) -> None:
    """Until `ray start --block` says the runtime started, the dashboard answers and the
    dashboard agent that takes job submissions listens."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
    deadline = time.monotonic() + timeout
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()}")
        if "Ray runtime started" in log.read_text() and listening(agent_port):
            try:
                with opener.open(f"{address}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray head at {address} after {timeout} s:\n{log.read_text()}")
        time.sleep(0.5)


@contextlib.contextmanager
def head_on_loopback(extra: tuple[str, ...] = ()) -> Iterator[tuple[dict, str, Path]]:
    """A throwaway Ray head on loopback (`ray start --head --block` in its own session),
    stopped by stop_head, never by `ray stop`, which stops every Ray instance on the
    machine; its temp dir goes even when the start fails."""
    temp = tempfile.mkdtemp(prefix="nmhead", dir="/tmp")
    head = None
    try:
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_TMPDIR": temp,
            "TMPDIR": temp,
            "RAY_AUTH_MODE": "disabled",  # a throwaway head on loopback only
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
        }
        dashboard = free_port()
        # the agent's default port (52365) belongs to whichever Ray on the machine took it
        # first (e.g. the tests' ray_local); a second agent there would never start
        agent = free_port()
        start = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            f"--port={free_port()}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *extra,
        ]
        log = Path(temp) / "ray-start.log"
        with log.open("w") as out:
            head = subprocess.Popen(
                start, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_head(head, address, agent, log, timeout=120)
        yield env, address, Path(temp)
    finally:
        left = stop_head(head, temp) if head is not None else set()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still alive: {sorted(left)}"


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen]:
    """A process `ray stop` takes for a Ray worker (its command line names
    default_worker.py), standing for another session's Ray: the teardown must spare it."""
    code = "import time; time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code, "default_worker.py"])
    try:
        yield proc
        assert proc.poll() is None, "the Ray head's teardown stopped a process it did not start"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def ray_head(bystander: subprocess.Popen) -> Iterator[tuple[dict, str, Path]]:
    with head_on_loopback() as head:
        yield head


def test_a_failed_head_start_leaves_no_temp_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    with pytest.raises(RuntimeError, match="ray start exited with 2"):
        with head_on_loopback(extra=("--no-such-option",)):
            pass
    assert len(made) == 1 and not Path(made[0]).exists()


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
    # the report went into the store, not into the job's temporary working directory
    assert f"report: {output}/report.html" in done.stdout
    page = (output / "report.html").read_text()
    assert "<html" in page and "e2e" in page and (output / "summary.parquet").stat().st_size > 0

    t = load(str(output))
    assert t.manifest["complete"] is True
    for name, schema in SCHEMAS.items():
        if name == "configs":  # the documented columns, then one per hyperparameter
            assert list(t[name].columns)[: len(schema)] == schema.names
            continue
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
