"""Study specs: loading, grids, and errors that name the field before any work starts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from noisemem.optim import AdamW, HeavyBall
from noisemem.studies.plan import Chunks
from noisemem.studies.spec import SpecError, StudySpec
from noisemem.studies.store import legacy_digest, same_study

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "output": "/tmp/noisemem-test-spec",
    "data": {"source": "digits"},
    "model": {"kind": "gelu_mlp", "hidden": 8},
    "optimizers": [
        {"kind": "HeavyBall", "lr": 0.1, "beta": [0.5, 0.9]},
        {"kind": "AdamW", "lr": 1e-3, "beta1": 0.9, "beta2": [0.99, 0.999], "eps": 1e-8},
    ],
    "training": {"batch_size": 32, "epochs": 2, "permutations": 10, "chunk_size": 4},
}


def with_(path: str, value: object) -> dict:
    raw = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[last] = value
    return raw


def test_grid_expands_in_a_stable_order_with_ids():
    spec = StudySpec.from_dict(BASE)
    assert [type(c.optimizer) for c in spec.configs] == [HeavyBall, HeavyBall, AdamW, AdamW]
    assert spec.configs[1].optimizer == HeavyBall(0.1, 0.9)
    assert spec.configs[3].optimizer.beta2 == 0.999
    assert len({c.id for c in spec.configs}) == 4
    chunks = Chunks.of(spec)
    assert chunks.count == 3 and list(chunks.indices(2)) == [8, 9]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "jobs" / "studies").glob("*.toml")), ids=lambda p: p.stem
)
def test_ready_specs_load(path):
    spec = StudySpec.from_toml(path)
    assert spec.name == path.stem


BAD = [
    ("optimizers.0.lr", -0.1, "optimizers[0].lr=-0.1", "> 0"),
    ("optimizers.1.beta2", [0.9, 1.5], "optimizers[1].beta2=1.5", "[0, 1)"),
    ("optimizers.0.kind", "SGDW", "optimizers[0].kind='SGDW'", "HeavyBall"),
    ("optimizers.0.momentum", 0.9, "unknown field 'momentum'", "beta"),
    ("data.source", "imagenet-local", "data.source='imagenet-local'", "digits, mnist1d"),
    ("data.normalize", "zscore", "data.normalize='zscore'", "standardize"),
    ("model.kind", "resnet", "model.kind='resnet'", "gelu_mlp"),
    ("training.batch_size", 0, "training.batch_size=0", ">= 1"),
    ("training.sampling", "shuffle", "training.sampling='shuffle'", "reshuffle"),
    ("training.permutations", 1, "training.permutations=1", ">= 2"),
    ("training.epochs", 1.5, "training.epochs=1.5", "integer"),
    ("runtime.gpu", "maybe", "runtime.gpu='maybe'", "auto"),
    ("probes.reference_steps", [0], "probes.reference_steps[0]=0", ">= 1"),
    ("data.label_column", 5, "data.label_column=5", "non-empty string"),
    ("data.label_column", "", "data.label_column=''", "non-empty string"),
    ("data.split", ["a"], "data.split=['a']", "non-empty string"),
    ("surprise", 1, "unknown field 'surprise'", "allowed fields"),
    (
        "optimizers",
        [{"kind": "Lion", "lr": 1e-4, "rho1": 0.9, "rho2": 0.99}],
        "optimizers[0].eps=None",
        "eps > 0",
    ),
]


@pytest.mark.parametrize("path, value, names, allowed", BAD, ids=[b[2] for b in BAD])
def test_bad_fields_are_named_with_the_allowed_values(path, value, names, allowed):
    with pytest.raises(SpecError) as err:
        StudySpec.from_dict(with_(path, value))
    assert names in str(err.value) and allowed in str(err.value)


def test_batch_size_larger_than_the_data_is_named():
    spec = StudySpec.from_dict(with_("training.batch_size", 5000))
    with pytest.raises(
        SpecError, match=r"training.batch_size=5000 .* <= the number of samples \(1797\)"
    ):
        spec.check_data_size(1797)


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        StudySpec.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(SpecError, match="not valid TOML"):
        StudySpec.from_toml(bad)


def test_digest_ignores_where_and_how_many_but_not_the_dtype():
    a = StudySpec.from_dict(BASE)
    b = StudySpec.from_dict({**with_("output", "/tmp/elsewhere"), "runtime": {"actors": 3}})
    c = StudySpec.from_dict(with_("training.epochs", 3))
    d = StudySpec.from_dict({**BASE, "runtime": {"dtype": "float64"}})
    assert a.digest == b.digest != c.digest
    assert d.digest != a.digest


@pytest.mark.parametrize("epoch_end", [False, True])
def test_memoryless_with_reshuffle_is_refused_on_load(epoch_end):
    # it was refused only with epoch_end (after the data had loaded) and ignored otherwise
    raw = with_("training.sampling", "reshuffle")
    raw.update(record={"memoryless": True}, probes={"init": True, "epoch_end": epoch_end})
    with pytest.raises(SpecError) as err:
        StudySpec.from_dict(raw)
    message = str(err.value)
    assert "record.memoryless=true" in message and "training.sampling='reshuffle'" in message
    assert "'permute' or 'replacement'" in message and "record.memoryless = false" in message


def test_memoryless_without_steps_is_refused_on_load():
    # the l_inf distances are columns of the steps table: they were computed, then dropped
    raw = {**BASE, "record": {"memoryless": True, "steps": False}}
    with pytest.raises(SpecError, match=r"record.memoryless=true needs record.steps=true"):
        StudySpec.from_dict(raw)
    for sampling in ("permute", "replacement"):
        raw = {**with_("training.sampling", sampling), "record": {"memoryless": True}}
        assert StudySpec.from_dict(raw).record.memoryless


def test_equivalent_specs_have_the_same_digest(tmp_path):
    import tomli_w

    a = StudySpec.from_dict(with_("model.hidden", 128))
    default_hidden = copy.deepcopy(BASE)
    del default_hidden["model"]["hidden"]  # 128 is the default
    scalar_grid = with_("model.hidden", 128)
    scalar_grid["optimizers"][0]["lr"] = [0.1]
    written_defaults = with_("model.hidden", 128)
    written_defaults["model"]["kwargs"] = {}
    written_defaults["runtime"] = {"dtype": "float32", "gpu": "never"}
    written_defaults["probes"] = {"init": True}
    for raw in (default_hidden, scalar_grid, written_defaults):
        b = StudySpec.from_dict(raw)
        assert b.model == a.model and b.configs == a.configs
        assert b.digest == a.digest
    # the store's study.toml (the resolved spec) reloads to the same digest
    stored = tmp_path / "study.toml"
    stored.write_text(tomli_w.dumps(a.as_dict()))
    assert StudySpec.from_toml(stored).digest == a.digest
    # config ids name the store's parts: the same grid keys in another order differ
    reordered = with_("model.hidden", 128)
    reordered["optimizers"][0] = {"kind": "HeavyBall", "beta": [0.5, 0.9], "lr": 0.1}
    assert StudySpec.from_dict(reordered).digest != a.digest


#: BASE's study.toml and spec digest as noisemem wrote them before digests were resolved
LEGACY_DIGEST = "c89bff8910251660"
LEGACY_STUDY_TOML = """
name = "t"
output = "/tmp/noisemem-test-spec"
seed = 0
[data]
source = "digits"
limit = 0
normalize = "unit"
label_column = "label"
split = "train"
[model]
kind = "gelu_mlp"
hidden = 8
[[optimizers]]
kind = "HeavyBall"
lr = 0.1
beta = [0.5, 0.9]
[[optimizers]]
kind = "AdamW"
lr = 0.001
beta1 = 0.9
beta2 = [0.99, 0.999]
eps = 1e-08
[training]
batch_size = 32
epochs = 2
sampling = "permute"
permutations = 10
chunk_size = 4
[probes]
init = true
epoch_end = false
reference_steps = []
[record]
steps = true
memoryless = false
vectors = false
[runtime]
actors = 0
cpus_per_actor = 1
gpu = "auto"
dtype = "float32"
"""


def test_a_store_with_a_legacy_digest_holds_the_same_study_when_its_spec_resolves_equal():
    base = StudySpec.from_dict(BASE)
    assert legacy_digest(base) == LEGACY_DIGEST and base.digest != LEGACY_DIGEST
    equivalent = with_("optimizers.0.lr", [0.1])  # the old digest hashed this as written
    spec = StudySpec.from_dict(equivalent)
    assert legacy_digest(spec) != LEGACY_DIGEST
    assert same_study(base, LEGACY_DIGEST, LEGACY_STUDY_TOML)
    assert same_study(spec, LEGACY_DIGEST, LEGACY_STUDY_TOML)
    assert same_study(spec, spec.digest)  # a store written by this noisemem
    # another study, a study.toml that is not what the digest was made of, or none: refused
    other = StudySpec.from_dict(with_("training.epochs", 3))
    assert not same_study(other, LEGACY_DIGEST, LEGACY_STUDY_TOML)
    tampered = LEGACY_STUDY_TOML.replace("epochs = 2", "epochs = 3")
    assert not same_study(other, LEGACY_DIGEST, tampered)
    assert not same_study(spec, LEGACY_DIGEST, None)
    assert not same_study(spec, LEGACY_DIGEST, "name = [unclosed")
    assert not same_study(spec, None, LEGACY_STUDY_TOML)


def test_relative_output_is_made_absolute():
    spec = StudySpec.from_dict(with_("output", "out/rel"))
    assert Path(spec.output).is_absolute() and spec.output.endswith("out/rel")


def test_training_fields_and_seeds_sweep_as_a_product_keyed_by_every_value_they_vary():
    raw = with_("training.batch_size", [16, 32])
    raw["seed"] = [0, 7]
    spec = StudySpec.from_dict(raw)
    assert spec.swept == ("batch_size", "seed")
    assert len(spec.configs) == 4 * 2 * 2  # optimizer grid x batch sizes x seeds
    first = spec.configs[:4]
    assert [(c.batch_size, c.seed) for c in first] == [(16, 0), (16, 7), (32, 0), (32, 7)]
    assert {c.optimizer for c in first} == {HeavyBall(0.1, 0.5)}
    assert first[1].id == "c001-HeavyBall-lr0.1-beta0.5-batch_size16-seed7"
    assert len({c.id for c in spec.configs}) == len(spec.configs)
    assert len(spec.settings) == 4 and all(c.epochs == 2 for c in spec.configs)
    # a list of one value is that value: the same configs, ids and digest
    single = StudySpec.from_dict(with_("training.batch_size", [32]))
    plain = StudySpec.from_dict(BASE)
    assert single.digest == plain.digest and single.configs == plain.configs
    assert single.swept == () and "batch_size" not in single.configs[0].id


@pytest.mark.parametrize(
    "path, value, needle",
    [
        ("training.batch_size", [], "training.batch_size=[] is not allowed"),
        ("training.batch_size", [16, 16], "must be distinct"),
        ("training.epochs", [1, 0], "training.epochs[1]=0"),
        ("training.sampling", ["permute", "shuffle"], "training.sampling[1]='shuffle'"),
        ("seed", [0, -1], "seed[1]=-1"),
    ],
)
def test_bad_sweeps_are_named(path, value, needle):
    with pytest.raises(SpecError) as err:
        StudySpec.from_dict(with_(path, value))
    assert needle in str(err.value)


def test_a_sweep_is_checked_against_the_data_and_the_memoryless_runs():
    spec = StudySpec.from_dict(with_("training.batch_size", [32, 4000]))
    with pytest.raises(SpecError, match=r"training.batch_size=4000 .* \(1797\)"):
        spec.check_data_size(1797)
    raw = with_("training.sampling", ["permute", "reshuffle"])
    raw["record"] = {"memoryless": True}
    with pytest.raises(SpecError, match=r"training.sampling='reshuffle'"):
        StudySpec.from_dict(raw)


def test_the_default_chunk_size_follows_the_work_of_a_run():
    from noisemem.studies.plan import AUTO_CHUNK_WORK, MAX_AUTO_CHUNK, MIN_CHUNKS, run_work

    def auto(**training) -> StudySpec:
        raw = copy.deepcopy(BASE)
        raw["training"] = {**raw["training"], **training}
        raw["training"].pop("chunk_size")
        return StudySpec.from_dict(raw)

    # BASE probes the initialisation only; its AdamW configs are the heavier runs
    light = auto(permutations=4096, epochs=1)  # 11 gradients a run: 91 by work, capped
    assert run_work(1, False, 1, False) == 1 + 10
    assert round(AUTO_CHUNK_WORK / 11) > MAX_AUTO_CHUNK == light.training.chunk_size
    heavy = auto(permutations=4096, epochs=20)  # 20 + 20 x 10 = 220 gradients: chunks of 5
    assert heavy.training.chunk_size == round(AUTO_CHUNK_WORK / 220) == 5
    few = auto(permutations=24, epochs=1)  # at least MIN_CHUNKS chunks per config
    assert few.training.chunk_size == 24 // MIN_CHUNKS == 3
    # the resolved size is the spec's: an explicit equal size is the same study
    raw = copy.deepcopy(BASE)
    raw["training"] = {**BASE["training"], "permutations": 24, "epochs": 1, "chunk_size": 3}
    explicit = StudySpec.from_dict(raw)
    assert explicit.digest == few.digest and not explicit.auto_chunks and few.auto_chunks
    assert few.as_dict()["training"]["chunk_size"] == 3
