"""Study specifications: a frozen dataclass loaded from TOML and validated on load.

The spec says what a study computes; how its permutations are split into work
(:mod:`noisemem.studies.plan`) and how its store is identified, laid out and written
(:mod:`noisemem.studies.store`) live beside it.

A study is data x model x a grid of optimizers x batch size x epochs x sampling scheme x
seed (each a single value or a list: the study is their product, one config per point) x
number of permutations x probe points. Every field is checked when the spec is loaded; an
error names the field (``optimizers[1].beta2``), the value and what is allowed. Example
(``jobs/studies/*.toml`` has complete ones)::

    name = "digits_heavy_ball_adam"
    output = "~/noisemem/studies/digits_heavy_ball_adam"  # a path or a pyarrow filesystem URI
    seed = 0                   # or a list of seeds (initialisation and batch orders)

    [data]
    source = "digits"          # digits | mnist1d | hub:<name> | a Parquet/CSV/Arrow/JSON file
    limit = 0                  # 0: every sample; N: the first N (a deterministic subset)
    normalize = "unit"         # unit | standardize | none

    [model]
    kind = "gelu_mlp"          # gelu_mlp | cnn | softmax | "package.module:Factory"
    hidden = 128

    [[optimizers]]             # lists expand into a grid
    kind = "HeavyBall"         # or "package.module:Class", a noisemem.optim.Optimizer
    lr = 0.1
    beta = [0.5, 0.9]

    [training]
    batch_size = [16, 32, 64]  # batch_size, epochs and sampling may be lists too
    epochs = 2
    sampling = "permute"       # permute | reshuffle | replacement
    permutations = 64
    chunk_size = 16            # "auto" (the default) follows the work of a run

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
import importlib
import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noisemem import checks
from noisemem.budget import parse_budget
from noisemem.checks import SAMPLINGS, SEED_LIMIT
from noisemem.optim import OPTIMIZERS, Optimizer
from noisemem.studies.plan import auto_chunk_size, run_work
from noisemem.studies.store import fingerprint, location

BUILTIN_DATA = ("digits", "mnist1d", "synthetic:cifar10")
BUILTIN_MODELS = ("gelu_mlp", "cnn", "softmax", "resnet18")
NORMALIZE = ("unit", "standardize", "none")
GPU_MODES = ("auto", "never", "always")
#: runtime.batched_probes: "auto" (on CUDA devices), "on", "off"
BATCHED_PROBES = ("auto", "on", "off")
DTYPES = ("float32", "float64")
#: the largest study the driver plans: orders per config, and chunks (work items) in all
MAX_PERMUTATIONS = 10_000_000
MAX_CHUNKS = 100_000
#: samplings with a fixed list of batches, which the memoryless trajectories need
MEMORYLESS_SAMPLINGS = tuple(s for s in SAMPLINGS if s != "reshuffle")


class SpecError(ValueError):
    """A study spec field has a value that is not allowed."""


def _fail(path: str, value: Any, allowed: str) -> SpecError:
    return checks.not_allowed(path, value, allowed, error=SpecError)  # type: ignore[return-value]


def _check_keys(section: str, raw: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        where = f"[{section}]" if section else "the top level"
        raise SpecError(
            f"unknown field {unknown[0]!r} in {where}; allowed fields: {', '.join(allowed)}"
        )


def _int(path: str, value: Any, low: int, high: float = float("inf")) -> int:
    allowed = f"it must be an integer >= {low}" + (
        f" and <= {high}" if high != float("inf") else ""
    )
    return checks.integer(path, value, low, high, allowed=allowed, error=SpecError)


def _bool(path: str, value: Any) -> bool:
    return checks.flag(path, value, words="true or false", error=SpecError)


def _name(path: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, value, f"it must be a non-empty string ({what})")
    return value


def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> str:
    return checks.choice(path, value, allowed, error=SpecError)


def _defaults(cls: type) -> dict[str, Any]:
    """The section's defaults, as its dataclass fields spell them (the one place they are)."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        )
    return out


def _section(cls: type, name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` over the section's defaults, after refusing unknown fields."""
    defaults = _defaults(cls)
    _check_keys(name, raw, tuple(defaults))
    return {**defaults, **raw}


@dataclass(frozen=True)
class DataSpec:
    source: str = "digits"
    limit: int = 0  # 0: every sample; N: the first N
    normalize: str = "unit"
    label_column: str = "label"
    split: str = "train"

    @classmethod
    def parse(cls, raw: Mapping[str, Any], base: Path | None) -> DataSpec:
        r = _section(cls, "data", raw)
        source = r["source"]
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
            limit=_int("data.limit", r["limit"], 0),
            normalize=_choice("data.normalize", r["normalize"], NORMALIZE),
            label_column=_name("data.label_column", r["label_column"], "the label column's name"),
            split=_name("data.split", r["split"], "a split name such as 'train'"),
        )


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "gelu_mlp"
    hidden: int = 128
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ModelSpec:
        r = _section(cls, "model", raw)
        kind = r["kind"]
        if not isinstance(kind, str) or (kind not in BUILTIN_MODELS and ":" not in kind):
            raise _fail(
                "model.kind", kind, f"use {', '.join(BUILTIN_MODELS)} or 'package.module:Factory'"
            )
        if not isinstance(r["kwargs"], Mapping):
            raise _fail("model.kwargs", r["kwargs"], "it must be a table of keyword arguments")
        return cls(kind=kind, hidden=_int("model.hidden", r["hidden"], 1), kwargs=r["kwargs"])


#: the training fields a study may sweep (lists), in the order config ids name them
SWEEPS = ("batch_size", "epochs", "sampling", "seed")


@dataclass(frozen=True)
class Setting:
    """What a config trains with besides its optimizer: one point of the training sweeps."""

    batch_size: int
    epochs: int
    sampling: str
    seed: int


@dataclass(frozen=True)
class Config:
    """One point of the study's product: a stable id, the optimizer and the training setting."""

    id: str
    index: int
    optimizer: Optimizer
    setting: Setting

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {"kind": self.optimizer.name, **dataclasses.asdict(self.optimizer)}

    @property
    def batch_size(self) -> int:
        return self.setting.batch_size

    @property
    def epochs(self) -> int:
        return self.setting.epochs

    @property
    def sampling(self) -> str:
        return self.setting.sampling

    @property
    def seed(self) -> int:
        return self.setting.seed


def optimizer_class(where: str, kind: Any) -> type[Optimizer]:
    """The optimizer a grid entry names: a built-in, or ``package.module:Class`` (any
    subclass of :class:`noisemem.optim.Optimizer`, importable wherever the study runs)."""
    if isinstance(kind, str) and kind in OPTIMIZERS:
        return OPTIMIZERS[kind]
    allowed = f"use one of {', '.join(OPTIMIZERS)} or 'package.module:Class'"
    if not isinstance(kind, str) or ":" not in kind:
        raise _fail(f"{where}.kind", kind, allowed)
    module_name, _, attr = kind.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise _fail(f"{where}.kind", kind, f"it cannot be imported ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Optimizer) and dataclasses.is_dataclass(cls)):
        raise _fail(
            f"{where}.kind", kind, "it must name a dataclass subclass of noisemem.optim.Optimizer"
        )
    return cls


def _missing(where: str, cls: type, given: Mapping[str, Any]) -> str | None:
    """The message for required hyperparameters a grid entry leaves out (None if none)."""
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in given]
    if not missing:
        return None
    optional = [f.name for f in dataclasses.fields(cls) if f.name not in required]
    return (
        f"{where}.{missing[0]} is missing; {cls.__name__} needs {', '.join(required)} "
        f"(optional: {', '.join(optional) or 'none'})"
    )


def _expand_optimizers(raw: Any) -> list[tuple[str, Optimizer]]:
    """Every point of the optimizer grids: its label (kind and grid values) and optimizer."""
    if not isinstance(raw, list) or not raw:
        raise _fail("optimizers", raw, "give at least one [[optimizers]] table")
    out: list[tuple[str, Optimizer]] = []
    for j, entry in enumerate(raw):
        where = f"optimizers[{j}]"
        if not isinstance(entry, Mapping):
            raise _fail(where, entry, "each entry must be a table")
        kind = entry.get("kind")
        cls = optimizer_class(where, kind)
        names = [f.name for f in dataclasses.fields(cls)]
        _check_keys(where, {k: v for k, v in entry.items() if k != "kind"}, tuple(names))
        grid = {k: (v if isinstance(v, list) else [v]) for k, v in entry.items() if k != "kind"}
        for k, values in grid.items():
            if not values:
                raise _fail(f"{where}.{k}", values, "a grid list needs at least one value")
        keys = list(grid)
        name = cls.__name__
        for combo in itertools.product(*(grid[k] for k in keys)):
            kw = dict(zip(keys, combo, strict=True))
            try:
                opt = cls(**kw)
            except TypeError as err:
                raise SpecError(_missing(where, cls, kw) or f"{where}: {err}") from err
            except ValueError as err:
                # the optimizer names the field ("AdamW: beta2=..."); say where it sits
                msg = str(err).removeprefix(f"{name}: ")
                raise SpecError(f"{where}.{msg}") from err
            if not opt.smooth:
                raise _fail(
                    f"{where}.eps",
                    None,
                    "studies evaluate Eq. (9), which needs the soft sign: set eps > 0",
                )
            out.append(("-".join([name, *(f"{k}{kw[k]}" for k in keys)]), opt))
    return out


def _product(
    optimizers: list[tuple[str, Optimizer]], sweeps: dict[str, tuple]
) -> tuple[Config, ...]:
    """The configs: each optimizer grid point times each training setting (optimizers
    outermost). Ids name the grid values and, for every swept field, its value."""
    swept = [k for k in SWEEPS if len(sweeps[k]) > 1]
    configs: list[Config] = []
    for label, opt in optimizers:
        for values in itertools.product(*(sweeps[k] for k in SWEEPS)):
            setting = Setting(**dict(zip(SWEEPS, values, strict=True)))
            parts = [label, *(f"{k}{getattr(setting, k)}" for k in swept)]
            index = len(configs)
            configs.append(Config(f"c{index:03d}-{'-'.join(parts)}", index, opt, setting))
    return tuple(configs)


def _values(path: str, value: Any, check: Any) -> tuple[Any, ...]:
    """A single value or a non-empty list of distinct values, each checked by ``check``."""
    if isinstance(value, tuple):  # a default, or a spec built in Python
        value = list(value)
    if not isinstance(value, list):
        return (check(path, value),)
    if not value:
        raise _fail(path, value, "a sweep list needs at least one value")
    out = tuple(check(f"{path}[{i}]", v) for i, v in enumerate(value))
    if len(set(out)) != len(out):
        raise _fail(path, value, "the values of a sweep must be distinct")
    return out


def _scalar_or_list(values: tuple[Any, ...]) -> Any:
    """How a swept field is written back: one value as itself, several as a list (so that
    ``batch_size = 32`` and ``batch_size = [32]`` are the same study)."""
    return values[0] if len(values) == 1 else list(values)


@dataclass(frozen=True)
class TrainingSpec:
    batch_size: tuple[int, ...] = (32,)  # each field but the last two may be a sweep list
    epochs: tuple[int, ...] = (1,)
    sampling: tuple[str, ...] = ("permute",)
    permutations: int = 32
    chunk_size: int = 0  # 0: "auto", resolved by StudySpec.from_dict (plan.auto_chunk_size)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> TrainingSpec:
        r = _section(cls, "training", raw)
        return cls(
            batch_size=_values("training.batch_size", r["batch_size"], lambda p, v: _int(p, v, 1)),
            epochs=_values("training.epochs", r["epochs"], lambda p, v: _int(p, v, 1)),
            sampling=_values(
                "training.sampling", r["sampling"], lambda p, v: _choice(p, v, SAMPLINGS)
            ),
            permutations=_int("training.permutations", r["permutations"], 2),
            chunk_size=(
                0
                if raw.get("chunk_size", "auto") == "auto"
                else _int("training.chunk_size", r["chunk_size"], 1)
            ),
        )

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: _scalar_or_list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class ProbeSpec:
    init: bool = True  # corrections at the initial parameters
    epoch_end: bool = False  # at each run's own parameters after every epoch
    reference_steps: tuple[int, ...] = ()  # at steps of the full-batch reference run

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ProbeSpec:
        r = _section(cls, "probes", raw)
        steps = r["reference_steps"]
        if not isinstance(steps, list | tuple):
            raise _fail("probes.reference_steps", steps, "give a list of integers >= 1")
        checked = tuple(_int(f"probes.reference_steps[{i}]", s, 1) for i, s in enumerate(steps))
        spec = cls(
            init=_bool("probes.init", r["init"]),
            epoch_end=_bool("probes.epoch_end", r["epoch_end"]),
            reference_steps=tuple(sorted(set(checked))),
        )
        if not (spec.init or spec.epoch_end or spec.reference_steps):
            raise SpecError("probes: every probe is off; enable init, epoch_end or reference_steps")
        return spec


@dataclass(frozen=True)
class RecordSpec:
    steps: bool = True  # per-step loss, accuracy, gradient norm
    memoryless: bool = False  # l_inf distances to the memoryless runs
    vectors: bool = False  # full correction vectors of every run

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> RecordSpec:
        r = _section(cls, "record", raw)
        return cls(**{k: _bool(f"record.{k}", v) for k, v in r.items()})


@dataclass(frozen=True)
class RuntimeSpec:
    actors: int = 0  # 0: one per available CPU (or GPU)
    cpus_per_actor: int = 1
    gpus_per_actor: float = 1.0  # with GPUs: a fraction lets several actors share one
    gpu: str = "auto"
    dtype: str = "float32"
    start_timeout: float = 300.0  # seconds to wait for the first actor (an autoscaling
    # cluster growing); a cluster this process started never grows: refused at once
    # bytes each actor's probes may hold (None: what the device has free), and batches per
    # graph of the batch gradients (0: as many as the budget allows); results do not depend
    # on either (not in the digest): a study may resume under another budget
    memory_budget: int | str | None = None
    graph_batches: int = 0
    # whether a chunk takes its runs' epoch-end probes together, one graph for a group of
    # runs (noisemem.ensemble): "auto" does on CUDA, where one probe per run leaves a GPU
    # idle on small models; on a CPU the flops are the same and one probe per run is as fast
    # (not in the digest: the numbers agree to rounding)
    batched_probes: str = "auto"

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> RuntimeSpec:
        r = _section(cls, "runtime", raw)
        gpus = r["gpus_per_actor"]
        ok = checks.is_real(gpus) and (0 < gpus <= 1 or (checks.is_integer(gpus) and gpus >= 1))
        if not ok:
            raise _fail(
                "runtime.gpus_per_actor", gpus, "give a fraction in (0, 1] or an integer >= 1"
            )
        return cls(
            actors=_int("runtime.actors", r["actors"], 0),
            cpus_per_actor=_int("runtime.cpus_per_actor", r["cpus_per_actor"], 1),
            gpus_per_actor=float(gpus),
            gpu=_choice("runtime.gpu", r["gpu"], GPU_MODES),
            dtype=_choice("runtime.dtype", r["dtype"], DTYPES),
            start_timeout=checks.real(
                "runtime.start_timeout",
                r["start_timeout"],
                low=0.0,
                allowed="it must be a number of seconds >= 0",
                error=SpecError,
            ),
            memory_budget=_memory_budget(r["memory_budget"]),
            graph_batches=_int("runtime.graph_batches", r["graph_batches"], 0),
            batched_probes=_choice("runtime.batched_probes", r["batched_probes"], BATCHED_PROBES),
        )


def _memory_budget(value: object) -> int | str | None:
    """``runtime.memory_budget`` as written (bytes or a string such as ``"8GiB"``), checked."""
    try:
        parse_budget(value)
    except ValueError:
        raise _fail(
            "runtime.memory_budget",
            value,
            'give bytes > 0 or a string such as "8GiB" or "512 MB" (B, kB, KiB, MB, MiB, '
            "GB, GiB, TB, TiB); leave it out for what the device has free",
        ) from None
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class StudySpec:
    """A validated study; :meth:`from_toml` / :meth:`from_dict` are the ways in."""

    name: str
    output: str  # where the store lives (:func:`noisemem.studies.store.location`)
    seed: tuple[int, ...]  # the seeds swept (one, unless the spec gives a list)
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
        output = location(raw.get("output", f"~/noisemem/studies/{name}"), error=SpecError)
        for section in sections:
            if section != "optimizers" and not isinstance(raw.get(section, {}), Mapping):
                raise _fail(section, raw.get(section), f"[{section}] must be a table")
        seed = _values("seed", raw.get("seed", 0), lambda p, v: _int(p, v, 0, SEED_LIMIT - 1))
        training = TrainingSpec.parse(raw.get("training", {}))
        sweeps = {k: getattr(training, k) for k in SWEEPS if k != "seed"} | {"seed": seed}
        spec = cls(
            name=name,
            output=output,
            seed=seed,
            data=DataSpec.parse(raw.get("data", {}), base),
            model=ModelSpec.parse(raw.get("model", {})),
            configs=_product(_expand_optimizers(raw.get("optimizers")), sweeps),
            training=training,
            probes=(probes := ProbeSpec.parse(raw.get("probes", {}))),
            record=RecordSpec.parse(raw.get("record", {})),
            runtime=RuntimeSpec.parse(raw.get("runtime", {})),
            raw=dict(raw),
        )
        if training.chunk_size == 0:
            fixed = int(probes.init) + len(probes.reference_steps)
            work = max(
                run_work(c.epochs, c.optimizer.linear, fixed, probes.epoch_end)
                for c in spec.configs
            )
            size = auto_chunk_size(training.permutations, work)
            spec = dataclasses.replace(
                spec, training=dataclasses.replace(training, chunk_size=size)
            )
        spec.check_combinations()
        spec.check_size()
        return spec

    @property
    def auto_chunks(self) -> bool:
        """Whether the spec leaves the chunk size to the work (``"auto"`` or not given)."""
        return dict(self.raw.get("training", {})).get("chunk_size", "auto") == "auto"

    def check_size(self) -> None:
        """Refuse studies too large to plan: every chunk is a work item and a store part."""
        t = self.training
        chunks = len(self.configs) * -(-t.permutations // t.chunk_size)
        if t.permutations > MAX_PERMUTATIONS:
            raise _fail(
                "training.permutations",
                t.permutations,
                f"at most {MAX_PERMUTATIONS:,} orders per config (the standard error falls "
                "as 1/sqrt(P): 1e6 orders already give it to 0.1%)",
            )
        if chunks > MAX_CHUNKS:
            raise _fail(
                "training.chunk_size",
                t.chunk_size,
                f"{len(self.configs)} configs x {t.permutations} permutations make {chunks:,} "
                f"chunks; at most {MAX_CHUNKS:,}: raise chunk_size",
            )

    def check_combinations(self) -> None:
        """Fields that are each allowed but cannot be honoured together (run by
        :meth:`from_dict`; again by a study's context, for specs made another way)."""
        if not self.record.memoryless:
            return
        for sampling in self.training.sampling:
            if sampling in MEMORYLESS_SAMPLINGS:
                continue
            raise SpecError(
                f"record.memoryless=true is not available with training.sampling="
                f"{sampling!r}: the memoryless trajectories follow a fixed list of "
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
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise SpecError(f"spec file {str(path)!r} does not exist") from err
        except IsADirectoryError as err:
            raise SpecError(f"spec file {str(path)!r} is a directory; give a .toml file") from err
        except UnicodeDecodeError as err:
            raise SpecError(
                f"spec file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from err
        except PermissionError as err:
            raise SpecError(f"spec file {str(path)!r} cannot be read (permission denied)") from err
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"spec file {str(path)!r} is not valid TOML: {err}") from err
        return cls.from_dict(raw, base=path.parent)

    def with_overrides(self, base: Path | None = None, **fields: Any) -> StudySpec:
        """This spec with top-level fields (``output``) or ``runtime`` fields
        (``gpu``, ``actors``) replaced, validated and resolved as the spec file itself is;
        None leaves a field as it is."""
        raw = dict(self.raw)
        for key, value in fields.items():
            if value is None:
                continue
            if key in ("gpu", "actors", "cpus_per_actor", "dtype"):
                raw["runtime"] = {**raw.get("runtime", {}), key: value}
            else:
                raw[key] = value
        return self if raw == dict(self.raw) else StudySpec.from_dict(raw, base=base)

    def check_data_size(self, num_samples: int) -> None:
        """Checks that need the data set's size (run before any actor starts)."""
        for b in self.training.batch_size:
            if b > num_samples:
                raise _fail(
                    "training.batch_size",
                    b,
                    f"it must be <= the number of samples ({num_samples})",
                )
        q = self.runtime.graph_batches
        fewest = num_samples // max(self.training.batch_size)
        if q > fewest:
            raise _fail(
                "runtime.graph_batches",
                q,
                f"it must be <= the batches per epoch ({fewest} at batch size "
                f"{max(self.training.batch_size)}), or 0 to choose from runtime.memory_budget",
            )

    @property
    def settings(self) -> tuple[Setting, ...]:
        """The distinct training settings of the configs, in config order."""
        return tuple(dict.fromkeys(c.setting for c in self.configs))

    @property
    def swept(self) -> tuple[str, ...]:
        """The fields of :data:`SWEEPS` the study gives more than one value."""
        return tuple(k for k in SWEEPS if len({getattr(c, k) for c in self.configs}) > 1)

    def as_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (what the store's ``study.toml`` holds). The
        optimizers stay as written (grids), since their spelling names the config ids."""
        out = dict(self.raw)
        out["output"] = self.output
        out["seed"] = _scalar_or_list(self.seed)
        out["data"] = dataclasses.asdict(self.data)
        out["model"] = {**dataclasses.asdict(self.model), "kwargs": dict(self.model.kwargs)}
        out["training"] = self.training.as_dict()
        out["probes"] = {**dataclasses.asdict(self.probes)}
        out["probes"]["reference_steps"] = list(self.probes.reference_steps)
        out["record"] = dataclasses.asdict(self.record)
        # None (memory_budget: the device's free memory) is left out: TOML has no null
        out["runtime"] = {
            k: v for k, v in dataclasses.asdict(self.runtime).items() if v is not None
        }
        return out

    def resolved(self) -> dict[str, Any]:
        """Everything that determines the results, resolved: defaults filled in, optimizer
        grids expanded into configs (id and every hyperparameter), the dtype; not where the
        results are written nor how many actors, CPUs or GPUs compute them."""
        d = self.as_dict()
        swept = self.swept
        return {
            "name": self.name,
            "seed": d["seed"],
            "data": d["data"],
            "model": d["model"],
            "configs": [
                {"id": c.id, **c.hyperparameters, **{k: getattr(c, k) for k in swept}}
                for c in self.configs
            ],
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
        return fingerprint(self.resolved())
