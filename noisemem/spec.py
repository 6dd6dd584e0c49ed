"""Study specifications: a frozen dataclass loaded from TOML and validated on load.

A study is data x model x a grid of optimizers x batch size x epochs x sampling scheme x
number of permutations x probe points x seeds. Every field is checked when the spec is
loaded; an error names the field (``optimizers[1].beta2``), the value and what is allowed.
Example (``jobs/studies/*.toml`` has complete ones)::

    name = "digits_heavy_ball_adam"
    output = "out/studies/digits_heavy_ball_adam"    # a path or any pyarrow filesystem URI
    seed = 0

    [data]
    source = "digits"          # digits | mnist1d | hub:<name> | a Parquet/CSV/Arrow/JSON file
    limit = 0                  # 0: every sample; N: the first N (a deterministic subset)
    normalize = "unit"         # unit | standardize | none

    [model]
    kind = "gelu_mlp"          # gelu_mlp | cnn | softmax | "package.module:Factory"
    hidden = 128

    [[optimizers]]             # lists expand into a grid
    kind = "HeavyBall"
    lr = 0.1
    beta = [0.5, 0.9]

    [training]
    batch_size = 32
    epochs = 2
    sampling = "permute"       # permute | reshuffle | replacement
    permutations = 64
    chunk_size = 16

    [probes]
    init = true                # corrections at the initial parameters
    epoch_end = true           # at each run's own parameters after every epoch
    reference_steps = [20]     # at steps of the full-batch reference run (same optimizer)

    [record]
    steps = true               # per-step loss, accuracy, gradient norm
    memoryless = false         # l_inf distances to the memoryless runs (costly; needs
                               # steps = true and sampling permute or replacement)
    vectors = false            # full correction vectors of every run

    [runtime]
    actors = 0                 # 0: one per available CPU (or GPU)
    cpus_per_actor = 1
    gpu = "auto"               # auto | never | always
    dtype = "float32"          # float32 | float64
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noisemem.expectation import SAMPLINGS, SEED_LIMIT
from noisemem.optim import OPTIMIZERS, Optimizer

BUILTIN_DATA = ("digits", "mnist1d")
BUILTIN_MODELS = ("gelu_mlp", "cnn", "softmax")
NORMALIZE = ("unit", "standardize", "none")
GPU_MODES = ("auto", "never", "always")
DTYPES = ("float32", "float64")
#: samplings with a fixed list of batches, which the memoryless trajectories need
MEMORYLESS_SAMPLINGS = tuple(s for s in SAMPLINGS if s != "reshuffle")


class SpecError(ValueError):
    """A study spec field has a value that is not allowed."""


def _fail(path: str, value: Any, allowed: str) -> SpecError:
    return SpecError(f"{path}={value!r} is not allowed; {allowed}")


def absolute_output(output: Any) -> str:
    """The store location every actor resolves the same way: a URI untouched, a relative
    path made absolute against this process's working directory (actors run in their own)."""
    if not isinstance(output, str) or not output:
        raise _fail(
            "output",
            output,
            "give a directory path or a pyarrow filesystem URI such as s3://bucket/study",
        )
    if "://" in output or Path(output).is_absolute():
        return output
    return str(Path.cwd() / output)


def _check_keys(section: str, raw: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        where = f"[{section}]" if section else "the top level"
        raise SpecError(
            f"unknown field {unknown[0]!r} in {where}; allowed fields: {', '.join(allowed)}"
        )


def _int(path: str, value: Any, low: int, high: float = math.inf) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        allowed = f"it must be an integer >= {low}"
        raise _fail(path, value, allowed + (f" and <= {high}" if high != math.inf else ""))
    return value


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, value, "it must be true or false")
    return value


def _name(path: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, value, f"it must be a non-empty string ({what})")
    return value


def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(path, value, f"use one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class DataSpec:
    source: str = "digits"
    limit: int = 0
    normalize: str = "unit"
    label_column: str = "label"
    split: str = "train"

    @classmethod
    def parse(cls, raw: Mapping[str, Any], base: Path | None) -> DataSpec:
        _check_keys("data", raw, tuple(f.name for f in dataclasses.fields(cls)))
        source = raw.get("source", "digits")
        if not isinstance(source, str) or not source:
            raise _fail("data.source", source, "give a data set name or a path")
        if source not in BUILTIN_DATA and not source.startswith("hub:"):
            path = Path(source)
            if not path.is_absolute() and base is not None and not path.exists():
                path = base / path
            if not path.exists():
                raise _fail(
                    "data.source",
                    source,
                    f"use {', '.join(BUILTIN_DATA)}, hub:<name> (a Hugging Face Hub data set), "
                    "or an existing Parquet/CSV/Arrow/JSON file or save_to_disk folder",
                )
            source = str(path)
        return cls(
            source=source,
            limit=_int("data.limit", raw.get("limit", 0), 0),
            normalize=_choice("data.normalize", raw.get("normalize", "unit"), NORMALIZE),
            label_column=_name(
                "data.label_column", raw.get("label_column", "label"), "the label column's name"
            ),
            split=_name("data.split", raw.get("split", "train"), "a split name such as 'train'"),
        )


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "gelu_mlp"
    hidden: int = 128
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ModelSpec:
        _check_keys("model", raw, ("kind", "hidden", "kwargs"))
        kind = raw.get("kind", "gelu_mlp")
        if not isinstance(kind, str) or (kind not in BUILTIN_MODELS and ":" not in kind):
            raise _fail(
                "model.kind", kind, f"use {', '.join(BUILTIN_MODELS)} or 'package.module:Factory'"
            )
        kwargs = raw.get("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise _fail("model.kwargs", kwargs, "it must be a table of keyword arguments")
        return cls(kind=kind, hidden=_int("model.hidden", raw.get("hidden", 128), 1), kwargs=kwargs)


@dataclass(frozen=True)
class Config:
    """One point of the optimizer grid: a stable id and the optimizer it describes."""

    id: str
    index: int
    optimizer: Optimizer

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {"kind": self.optimizer.name, **dataclasses.asdict(self.optimizer)}


def _expand_optimizers(raw: Any) -> tuple[Config, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail("optimizers", raw, "give at least one [[optimizers]] table")
    configs: list[Config] = []
    for j, entry in enumerate(raw):
        where = f"optimizers[{j}]"
        if not isinstance(entry, Mapping):
            raise _fail(where, entry, "each entry must be a table")
        kind = entry.get("kind")
        if kind not in OPTIMIZERS:
            raise _fail(f"{where}.kind", kind, f"use one of {', '.join(OPTIMIZERS)}")
        cls = OPTIMIZERS[kind]
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        _check_keys(where, {k: v for k, v in entry.items() if k != "kind"}, tuple(names))
        grid = {k: (v if isinstance(v, list) else [v]) for k, v in entry.items() if k != "kind"}
        for k, values in grid.items():
            if not values:
                raise _fail(f"{where}.{k}", values, "a grid list needs at least one value")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            kw = dict(zip(keys, combo, strict=True))
            try:
                opt = cls(**kw)
            except TypeError as err:
                raise SpecError(f"{where}: {err}") from err
            except ValueError as err:
                # the optimizer names the field ("AdamW: beta2=..."); say where it sits
                msg = str(err).removeprefix(f"{kind}: ")
                raise SpecError(f"{where}.{msg}") from err
            if not opt.smooth:
                raise _fail(
                    f"{where}.eps",
                    None,
                    "studies evaluate Eq. (9), which needs the soft sign: set eps > 0",
                )
            label = "-".join(f"{k}{kw[k]}" for k in keys)
            configs.append(Config(f"c{len(configs):03d}-{kind}-{label}", len(configs), opt))
    return tuple(configs)


@dataclass(frozen=True)
class TrainingSpec:
    batch_size: int = 32
    epochs: int = 1
    sampling: str = "permute"
    permutations: int = 32
    chunk_size: int = 16

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> TrainingSpec:
        _check_keys("training", raw, tuple(f.name for f in dataclasses.fields(cls)))
        return cls(
            batch_size=_int("training.batch_size", raw.get("batch_size", 32), 1),
            epochs=_int("training.epochs", raw.get("epochs", 1), 1),
            sampling=_choice("training.sampling", raw.get("sampling", "permute"), SAMPLINGS),
            permutations=_int("training.permutations", raw.get("permutations", 32), 2, SEED_LIMIT),
            chunk_size=_int("training.chunk_size", raw.get("chunk_size", 16), 1),
        )


@dataclass(frozen=True)
class ProbeSpec:
    init: bool = True
    epoch_end: bool = False
    reference_steps: tuple[int, ...] = ()

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ProbeSpec:
        _check_keys("probes", raw, ("init", "epoch_end", "reference_steps"))
        steps = raw.get("reference_steps", [])
        if not isinstance(steps, list):
            raise _fail("probes.reference_steps", steps, "give a list of integers >= 1")
        checked = tuple(_int(f"probes.reference_steps[{i}]", s, 1) for i, s in enumerate(steps))
        spec = cls(
            init=_bool("probes.init", raw.get("init", True)),
            epoch_end=_bool("probes.epoch_end", raw.get("epoch_end", False)),
            reference_steps=tuple(sorted(set(checked))),
        )
        if not (spec.init or spec.epoch_end or spec.reference_steps):
            raise SpecError("probes: every probe is off; enable init, epoch_end or reference_steps")
        return spec


@dataclass(frozen=True)
class RecordSpec:
    steps: bool = True
    memoryless: bool = False
    vectors: bool = False

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> RecordSpec:
        _check_keys("record", raw, ("steps", "memoryless", "vectors"))
        return cls(**{k: _bool(f"record.{k}", raw.get(k, d)) for k, d in _defaults(cls).items()})


@dataclass(frozen=True)
class RuntimeSpec:
    actors: int = 0
    cpus_per_actor: int = 1
    gpu: str = "auto"
    dtype: str = "float32"

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> RuntimeSpec:
        _check_keys("runtime", raw, ("actors", "cpus_per_actor", "gpu", "dtype"))
        return cls(
            actors=_int("runtime.actors", raw.get("actors", 0), 0),
            cpus_per_actor=_int("runtime.cpus_per_actor", raw.get("cpus_per_actor", 1), 1),
            gpu=_choice("runtime.gpu", raw.get("gpu", "auto"), GPU_MODES),
            dtype=_choice("runtime.dtype", raw.get("dtype", "float32"), DTYPES),
        )


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class StudySpec:
    """A validated study; :meth:`from_toml` / :meth:`from_dict` are the ways in."""

    name: str
    output: str
    seed: int
    data: DataSpec
    model: ModelSpec
    configs: tuple[Config, ...]
    training: TrainingSpec
    probes: ProbeSpec
    record: RecordSpec
    runtime: RuntimeSpec
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base: Path | None = None) -> StudySpec:
        sections = ("data", "model", "optimizers", "training", "probes", "record", "runtime")
        _check_keys("", raw, ("name", "output", "seed", *sections))
        name = raw.get("name")
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise _fail("name", name, "use letters, digits, '-' and '_'")
        output = absolute_output(raw.get("output", f"out/studies/{name}"))
        for section in sections:
            if section != "optimizers" and not isinstance(raw.get(section, {}), Mapping):
                raise _fail(section, raw.get(section), f"[{section}] must be a table")
        spec = cls(
            name=name,
            output=output,
            seed=_int("seed", raw.get("seed", 0), 0, SEED_LIMIT - 1),
            data=DataSpec.parse(raw.get("data", {}), base),
            model=ModelSpec.parse(raw.get("model", {})),
            configs=_expand_optimizers(raw.get("optimizers")),
            training=TrainingSpec.parse(raw.get("training", {})),
            probes=ProbeSpec.parse(raw.get("probes", {})),
            record=RecordSpec.parse(raw.get("record", {})),
            runtime=RuntimeSpec.parse(raw.get("runtime", {})),
            raw=dict(raw),
        )
        spec.check_combinations()
        return spec

    def check_combinations(self) -> None:
        """Fields that are each allowed but cannot be honoured together (run by
        :meth:`from_dict`; again by a study's context, for specs made another way)."""
        if not self.record.memoryless:
            return
        if self.training.sampling not in MEMORYLESS_SAMPLINGS:
            raise SpecError(
                f"record.memoryless=true is not available with training.sampling="
                f"{self.training.sampling!r}: the memoryless trajectories follow a fixed list of "
                f"batches; use training.sampling = {' or '.join(map(repr, MEMORYLESS_SAMPLINGS))}"
                ", or record.memoryless = false"
            )
        if not self.record.steps:
            raise SpecError(
                "record.memoryless=true needs record.steps=true: the l_inf distances to the "
                "memoryless runs are columns of the steps table; set record.steps = true, or "
                "record.memoryless = false"
            )

    @classmethod
    def from_toml(cls, path: str | Path) -> StudySpec:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as err:
            raise SpecError(f"spec file {str(path)!r} does not exist") from err
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"spec file {str(path)!r} is not valid TOML: {err}") from err
        return cls.from_dict(raw, base=path.parent)

    def check_data_size(self, num_samples: int) -> None:
        """Checks that need the data set's size (run before any actor starts)."""
        b = self.training.batch_size
        if b > num_samples:
            raise _fail(
                "training.batch_size", b, f"it must be <= the number of samples ({num_samples})"
            )
        if self.training.sampling == "permute" and num_samples // b < 1:
            raise _fail("training.batch_size", b, "the data must hold at least one batch")

    @property
    def num_chunks(self) -> int:
        return -(-self.training.permutations // self.training.chunk_size)

    def chunk_indices(self, chunk: int) -> range:
        c = self.training.chunk_size
        return range(chunk * c, min((chunk + 1) * c, self.training.permutations))

    def to_toml_dict(self) -> dict[str, Any]:
        """The resolved spec (what ``study.toml`` in the store holds), as plain data. The
        optimizers stay as written (grids), since their spelling names the config ids."""
        out = dict(self.raw)
        out["output"] = self.output
        out["seed"] = self.seed
        out["data"] = dataclasses.asdict(self.data)
        out["model"] = {**dataclasses.asdict(self.model), "kwargs": dict(self.model.kwargs)}
        out["training"] = dataclasses.asdict(self.training)
        out["probes"] = {**dataclasses.asdict(self.probes)}
        out["probes"]["reference_steps"] = list(self.probes.reference_steps)
        out["record"] = dataclasses.asdict(self.record)
        out["runtime"] = dataclasses.asdict(self.runtime)
        return out

    def resolved(self) -> dict[str, Any]:
        """Everything that determines the results, resolved: defaults filled in, optimizer
        grids expanded into configs (id and every hyperparameter), the dtype; not where the
        results are written nor how many actors, CPUs or GPUs compute them."""
        d = self.to_toml_dict()
        return {
            "name": self.name,
            "seed": self.seed,
            "data": d["data"],
            "model": d["model"],
            "configs": [{"id": c.id, **c.hyperparameters} for c in self.configs],
            "training": d["training"],
            "probes": d["probes"],
            "record": d["record"],
            "dtype": self.runtime.dtype,
        }

    @property
    def digest(self) -> str:
        """A hash of :meth:`resolved`: equivalent specs (a default written out or left out,
        ``beta = 0.9`` or ``beta = [0.9]``) have the same digest. Config ids are part of it:
        they name the store's parts, so specs whose ids differ (the same grid keys in
        another order) are different studies to the store."""
        return _hash(self.resolved())

    @property
    def legacy_digest(self) -> str:
        """The digest noisemem wrote before the resolved one (schema version 1 stores): a
        hash of the ``model`` and ``optimizers`` sections as written, with the rest resolved.
        Only :meth:`same_study` uses it, to recognise such stores."""
        d = self.to_toml_dict()
        d.pop("output", None)
        if "model" in self.raw:
            d["model"] = self.raw["model"]
        else:
            d.pop("model")
        d["runtime"] = {"dtype": self.runtime.dtype}
        return _hash(d)

    def same_study(self, stored_digest: str | None, stored_toml: str | None = None) -> bool:
        """Whether a store whose manifest holds ``stored_digest`` (and whose ``study.toml``
        holds ``stored_toml``) holds this study, so that it may be resumed.

        True when the digests are equal. A store written before digests were resolved holds
        a :attr:`legacy_digest`, which equivalent specs may not share; then its
        ``study.toml`` decides: when that file is the spec the stored digest was made of
        (its own digest, either scheme, equals ``stored_digest``) and it resolves to this
        spec's :attr:`digest`, the study is the same. Anything unreadable counts as
        different (the caller refuses to resume rather than mixing two studies' rows).
        """
        if stored_digest == self.digest:
            return True
        if stored_digest is None or stored_toml is None:
            return False
        try:
            stored = StudySpec.from_dict(tomllib.loads(stored_toml))
        except (SpecError, tomllib.TOMLDecodeError):
            return False
        if stored_digest not in (stored.digest, stored.legacy_digest):
            return False
        return stored.digest == self.digest


def _hash(d: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
