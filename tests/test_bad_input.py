"""Every bad input a user can give the command line ends in one line naming the field or path
and what to do, with exit code 2 (bad input) or 1 (a failed check), and no traceback.

Each row: an id, how to make the case (it returns the argv, given a temporary directory),
the exact message (``{tmp}`` stands for the directory) and the exit code. None of these
needs Ray: each is refused before a cluster starts.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w

from noisemem.cli import main

BASE = {
    "name": "bad",
    "data": {"source": "digits", "limit": 64},
    "model": {"kind": "softmax"},
    "optimizers": [{"kind": "HeavyBall", "lr": 0.1, "beta": 0.9}],
    "training": {"batch_size": 32, "permutations": 2, "chunk_size": 2},
}


def spec(tmp: Path, *argv: str, **changes: object) -> list[str]:
    """``noisemem run`` of BASE with ``changes`` ("a.b" keys set nested values)."""
    raw = copy.deepcopy(BASE)
    raw["output"] = str(tmp / "store")
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = tmp / "spec.toml"
    path.write_text(tomli_w.dumps(raw))
    return ["run", str(path), *argv]


def written(tmp: Path, name: str, data: bytes | str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def store_with(tmp: Path, manifest: object) -> list[str]:
    written(tmp, "store/manifest.json", json.dumps(manifest))
    return ["status", str(tmp / "store")]


OPT = "optimizers.0"
CASES: list[tuple[str, Callable[[Path], list[str]], str, int]] = [
    # -- the spec file
    ("spec_missing", lambda t: ["run", str(t / "nope.toml")],
     "spec file '{tmp}/nope.toml' does not exist", 2),
    ("spec_is_a_directory", lambda t: ["run", str(t)],
     "spec file '{tmp}' is a directory; give a .toml file", 2),
    ("spec_not_utf8", lambda t: ["run", str(written(t, "s.toml", b"name = '\xff'"))],
     "spec file '{tmp}/s.toml' is not UTF-8 text (invalid start byte at byte 8)", 2),
    ("spec_not_toml", lambda t: ["run", str(written(t, "s.toml", "name = [unclosed"))],
     "spec file '{tmp}/s.toml' is not valid TOML: Invalid value (at line 1, column 9)", 2),
    ("unknown_top_level_field", lambda t: spec(t, surprise=1),
     "unknown field 'surprise' in the top level; allowed fields: name, output, seed, data, "
     "model, optimizers, training, probes, record, runtime", 2),
    ("bad_name", lambda t: spec(t, name="a b"),
     "name='a b' is not allowed; use letters, digits, '-' and '_'", 2),
    ("no_optimizers", lambda t: spec(t, optimizers=None),
     "optimizers=None is not allowed; give at least one [[optimizers]] table", 2),
    ("unknown_optimizer", lambda t: spec(t, **{f"{OPT}.kind": "SGDW"}),
     "optimizers[0].kind='SGDW' is not allowed; use one of HeavyBall, Nesterov, AdamW, NAdamW, "
     "Lion or 'package.module:Class'", 2),
    ("optimizer_not_importable", lambda t: spec(t, **{f"{OPT}.kind": "nowhere:Opt"}),
     "optimizers[0].kind='nowhere:Opt' is not allowed; it cannot be imported (No module named "
     "'nowhere')", 2),
    ("missing_hyperparameter", lambda t: spec(
        t, optimizers=[{"kind": "AdamW", "lr": 1e-3, "beta1": 0.9, "eps": 1e-8}]),
     "optimizers[0].beta2 is missing; AdamW needs lr, beta1, beta2, eps (optional: "
     "weight_decay, eps_in_sqrt)", 2),
    ("bad_hyperparameter", lambda t: spec(t, **{f"{OPT}.lr": -0.1}),
     "optimizers[0].lr=-0.1 is not allowed; lr must be a finite number > 0", 2),
    ("unknown_hyperparameter", lambda t: spec(t, **{f"{OPT}.momentum": 0.9}),
     "unknown field 'momentum' in [optimizers[0]]; allowed fields: lr, beta", 2),
    ("sign_lion", lambda t: spec(t, optimizers=[{"kind": "Lion", "lr": 1e-4, "rho1": 0.9,
                                                  "rho2": 0.99}]),
     "optimizers[0].eps=None is not allowed; studies evaluate Eq. (9), which needs the soft "
     "sign: set eps > 0", 2),
    ("empty_grid", lambda t: spec(t, **{f"{OPT}.beta": []}),
     "optimizers[0].beta=[] is not allowed; a grid list needs at least one value", 2),
    ("batch_size_zero", lambda t: spec(t, **{"training.batch_size": 0}),
     "training.batch_size=0 is not allowed; it must be an integer >= 1", 2),
    ("batch_size_sweep_repeats", lambda t: spec(t, **{"training.batch_size": [32, 32]}),
     "training.batch_size=[32, 32] is not allowed; the values of a sweep must be distinct", 2),
    ("bad_sampling", lambda t: spec(t, **{"training.sampling": "shuffle"}),
     "training.sampling='shuffle' is not allowed; use one of permute, reshuffle, replacement",
     2),
    ("fractional_epochs", lambda t: spec(t, **{"training.epochs": 1.5}),
     "training.epochs=1.5 is not allowed; it must be an integer >= 1", 2),
    ("one_permutation", lambda t: spec(t, **{"training.permutations": 1}),
     "training.permutations=1 is not allowed; it must be an integer >= 2", 2),
    ("absurd_permutations", lambda t: spec(t, **{"training.permutations": 2**32}),
     "training.permutations=4294967296 is not allowed; at most 10,000,000 orders per config "
     "(the standard error falls as 1/sqrt(P): 1e6 orders already give it to 0.1%)", 2),
    ("absurd_chunks", lambda t: spec(
        t, **{"training.permutations": 1_000_000, "training.chunk_size": 1}),
     "training.chunk_size=1 is not allowed; 1 configs x 1000000 permutations make 1,000,000 "
     "chunks; at most 100,000: raise chunk_size", 2),
    ("bad_seed", lambda t: spec(t, seed=-1),
     "seed=-1 is not allowed; it must be an integer >= 0 and <= 4294967295", 2),
    ("memoryless_with_reshuffle", lambda t: spec(
        t, **{"training.sampling": "reshuffle", "record.memoryless": True}),
     "record.memoryless=true is not available with training.sampling='reshuffle': the "
     "memoryless trajectories follow a fixed list of batches; use training.sampling = "
     "'permute' or 'replacement', or record.memoryless = false", 2),
    ("every_probe_off", lambda t: spec(t, probes={"init": False}),
     "probes: every probe is off; enable init, epoch_end or reference_steps", 2),
    ("bad_record_flag", lambda t: spec(t, **{"record.steps": "yes"}),
     "record.steps='yes' is not allowed; it must be true or false", 2),
    ("bad_gpu_mode", lambda t: spec(t, **{"runtime.gpu": "maybe"}),
     "runtime.gpu='maybe' is not allowed; use one of auto, never, always", 2),
    ("bad_gpus_per_actor", lambda t: spec(t, **{"runtime.gpus_per_actor": 1.5}),
     "runtime.gpus_per_actor=1.5 is not allowed; give a fraction in (0, 1] or an integer >= 1",
     2),
    ("negative_start_timeout", lambda t: spec(t, **{"runtime.start_timeout": -1}),
     "runtime.start_timeout=-1 is not allowed; it must be a number of seconds >= 0", 2),
    ("bad_memory_budget", lambda t: spec(t, **{"runtime.memory_budget": "8 parsecs"}),
     "runtime.memory_budget='8 parsecs' is not allowed; give bytes > 0 or a string such as "
     '"8GiB" or "512 MB" (B, kB, KiB, MB, MiB, GB, GiB, TB, TiB); leave it out for what the '
     "device has free", 2),
    ("zero_memory_budget", lambda t: spec(t, **{"runtime.memory_budget": 0}),
     "runtime.memory_budget=0 is not allowed; give bytes > 0 or a string such as "
     '"8GiB" or "512 MB" (B, kB, KiB, MB, MiB, GB, GiB, TB, TiB); leave it out for what the '
     "device has free", 2),
    ("negative_graph_batches", lambda t: spec(t, **{"runtime.graph_batches": -1}),
     "runtime.graph_batches=-1 is not allowed; it must be an integer >= 0", 2),
    ("unknown_batched_probes", lambda t: spec(t, **{"runtime.batched_probes": True}),
     "runtime.batched_probes=True is not allowed; use one of auto, on, off", 2),
    # -- data and model (refused before Ray starts, after the data has loaded)
    ("unknown_data_source", lambda t: spec(t, **{"data.source": "imagenet-local"}),
     "data.source='imagenet-local' is not allowed; use digits, mnist1d, synthetic:cifar10, "
     "hub:<name> (a Hugging Face Hub data set), or an existing Parquet/CSV/Arrow/JSON file or "
     "save_to_disk folder",
     2),
    ("hub_offline", lambda t: spec(t, **{"data.source": "hub:mnist"}),
     "data.source='hub:mnist': the Hugging Face Hub cannot be reached (offline mode is set); "
     "load it where there is network (datasets.load_dataset('mnist').save_to_disk(DIR)) and "
     "set data.source to DIR; the loader said: Couldn't reach 'mnist' on the Hub "
     "(OfflineModeIsEnabled)", 2),
    ("text_named_parquet", lambda t: spec(
        t, **{"data.source": str(written(t, "d.parquet", "not parquet"))}),
     "data.source='{tmp}/d.parquet' cannot be read (ArrowInvalid: Parquet magic bytes not "
     "found in footer. Either the file is corrupted or this is not a parquet file.)", 2),
    ("unknown_label_column", lambda t: spec(t, **{"data.label_column": "digit"}),
     "data.label_column='digit' is not a column; columns: ['pixels', 'label']", 2),
    ("batch_larger_than_data", lambda t: spec(t, **{"training.batch_size": 500}),
     "training.batch_size=500 is not allowed; it must be <= the number of samples (64)", 2),
    ("memory_budget_below_one_graph", lambda t: spec(t, **{"runtime.memory_budget": "60 kB"}),
     "runtime.memory_budget='60 kB' is too small for c000-HeavyBall-lr0.1-beta0.9: "
     "memory_budget=58.6 KiB cannot hold the 2 (m, d) arrays of Eq. (9) for HeavyBall (m=2, "
     "d=650, torch.float32: 10.2 KiB) plus one batch's gradient graph (5.32 KiB, x4.5 at its "
     "peak); use window='online' (it keeps O(L d) and the graph of a few steps at a time), "
     "fewer batches, or a larger memory_budget", 2),
    ("more_graph_batches_than_batches", lambda t: spec(t, **{"runtime.graph_batches": 3}),
     "runtime.graph_batches=3 is not allowed; it must be <= the batches per epoch (2 at batch "
     "size 32), or 0 to choose from runtime.memory_budget", 2),
    ("unknown_model", lambda t: spec(t, **{"model.kind": "resnet"}),
     "model.kind='resnet' is not allowed; use gelu_mlp, cnn, softmax, resnet18 or "
     "'package.module:Factory'", 2),
    ("model_not_importable", lambda t: spec(t, **{"model.kind": "nowhere.module:Net"}),
     "model.kind='nowhere.module:Net' cannot be imported: No module named 'nowhere'", 2),
    ("model_kwargs_misfit", lambda t: spec(
        t, model={"kind": "torch.nn:Linear", "kwargs": {"bias": True}}),
     "model.kwargs={{'bias': True}} do not fit model.kind='torch.nn:Linear': Linear.__init__() "
     "got an unexpected keyword argument 'inputs'", 2),
    ("cnn_channels", lambda t: spec(t, model={"kind": "cnn", "kwargs": {"channels": 0}}),
     "model.kwargs.channels=0 is not allowed; use an int >= 1", 2),
    # -- command-line arguments and the output
    ("negative_actors", lambda t: spec(t, "--actors", "-1"),
     "actors=-1 is not allowed; give an integer >= 0 (0: one per available CPU or GPU) or "
     "None (use the spec's runtime.actors)", 2),
    ("empty_output", lambda t: spec(t, "--output", ""),
     "output='' is not allowed; give a directory path or a pyarrow filesystem URI such as "
     "s3://bucket/study (an empty path would silently mean the working directory)", 2),
    ("output_is_a_file", lambda t: spec(t, "--output", str(written(t, "f", "x"))),
     "output='{tmp}/f' is a file; give a directory for the store", 2),
    ("output_under_a_file", lambda t: spec(t, "--output", str(written(t, "f", "x") / "s")),
     "output='{tmp}/f/s' lies under '{tmp}/f', which is a file; give a directory path", 2),
    ("output_not_writable", lambda t: spec(t, "--output", "/proc/noisemem/store"),
     "output='/proc/noisemem/store' cannot be written ('/proc' is not writable); give a "
     "directory you can write", 2),
    ("output_among_user_files", lambda t: spec(
        t, "--output", str(written(t, "mine/notes.txt", "x").parent)),
     "output='{tmp}/mine' is a directory that holds files but no noisemem study (notes.txt); "
     "give a new or empty directory", 2),
    ("report_dir_not_writable", lambda t: spec(t, "--report-dir", str(written(t, "f", "x"))),
     "--report-dir='{tmp}/f' cannot be written ('{tmp}/f' is not a writable folder)", 2),
    ("output_of_another_study", lambda t: spec(
        t, "--output", str(store_with(t, {"schema_version": 3, "study": "other",
                                          "spec_digest": "0123456789abcdef", "configs": [],
                                          "permutations": 2})[1])),
     "output='{tmp}/store' holds a different study (digest 0123456789abcdef != "
     "{digest}); choose another output directory", 2),
    ("output_of_a_newer_schema", lambda t: spec(
        t, "--output", str(store_with(t, {"schema_version": 99, "study": "bad",
                                          "configs": [], "permutations": 2})[1])),
     "output='{tmp}/store' holds a store of schema version 99, but this noisemem reads schema "
     "versions (1, 2, 3) and writes 3: choose another output directory (or finish that study "
     "with the noisemem that started it)", 2),
    ("output_with_a_truncated_manifest", lambda t: spec(
        t, "--output", str(written(t, "store/manifest.json", '{"schema_ver').parent)),
     "output='{tmp}/store': {tmp}/store/manifest.json is not a readable manifest (Unterminated "
     "string starting at: line 1 column 2 (char 1)); restore it or choose another output "
     "directory", 2),
    # -- reading stores
    ("status_of_a_missing_path", lambda t: ["status", str(t / "nothing")],
     "path='{tmp}/nothing' does not exist", 2),
    ("status_of_an_empty_folder", lambda t: ["status", str(t)],
     "path='{tmp}' holds no noisemem study (no manifest.json)", 2),
    ("show_of_a_file", lambda t: ["show", str(written(t, "f", "x"))],
     "path='{tmp}/f' is a file, not a study store (a directory)", 2),
    ("status_of_a_truncated_manifest", lambda t: store_with(t, "{") and [
        "status", str(written(t, "store/manifest.json", '{"study": "x"').parent)],
     "{tmp}/store/manifest.json is not a readable manifest (Expecting ',' delimiter: line 1 "
     "column 14 (char 13)); restore it or choose another output directory", 2),
    ("status_of_a_manifest_without_study", lambda t: store_with(
        t, {"schema_version": 3, "configs": [], "permutations": 2}),
     "path='{tmp}/store': its manifest.json has no 'study'; it is damaged", 2),
    ("verify_of_a_newer_schema", lambda t: ["verify", store_with(
        t, {"schema_version": 99, "study": "x", "configs": [], "permutations": 2})[1]],
     "path='{tmp}/store': schema version 99 is not one this noisemem reads (1, 2, 3)", 2),
    ("verify_of_an_unfinished_store", lambda t: ["verify", store_with(
        t, {"schema_version": 3, "study": "x", "chunks": 1, "permutations": 2,
            "configs": [{"id": "c000-HeavyBall"}]})[1]],
     "{tmp}/store: 2 item(s) missing, failed or damaged; `noisemem run` of its spec computes "
     "exactly those again", 1),
]  # fmt: skip


@pytest.mark.parametrize("make, message, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_an_exit_code(tmp_path, capsys, make, message, code):
    argv = make(tmp_path)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = message.format(tmp=tmp_path, digest=_digest(argv))
    assert err == f"noisemem: {expected}\n"


def _digest(argv: list[str]) -> str:
    if argv[0] != "run" or not argv[1].endswith(".toml"):
        return ""
    from noisemem.studies.spec import StudySpec

    try:
        return StudySpec.from_toml(argv[1]).digest
    except ValueError:
        return ""


def test_the_table_is_large_and_every_field_of_the_spec_room_is_in_it():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("how", ["spec", "--output"])
def test_a_relative_output_under_ray_job_submit_is_refused(tmp_path, capsys, monkeypatch, how):
    from noisemem.cli import RAY_JOB_ENV

    monkeypatch.setenv(RAY_JOB_ENV, "{}")  # what Ray's job supervisor sets
    written = "out/rel"
    argv = spec(tmp_path, output=written) if how == "spec" else spec(tmp_path, "--output", written)
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"noisemem: output={written!r} is relative, and under ray job submit the job runs in "
        "Ray's temporary copy of the working directory, which is deleted with the job: give an "
        "absolute path (or ~/...) or a URI such as s3://bucket/study, in the spec or with "
        "--output\n"
    )
