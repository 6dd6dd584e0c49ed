"""The ``noisemem`` command: ``validate`` a spec, ``run`` a study, ``status``, ``verify`` and
``show`` a store, write its ``report`` (``report.html`` and ``summary.parquet`` in the store).

The front door: it reads specs and stores (:mod:`noisemem.studies`), runs studies on Ray
(:mod:`noisemem.studies.driver`, imported only when a study runs) and shows what the
analysis (:mod:`noisemem.analysis`) makes of a store. Every failure it can name ends in one
line on stderr, ``noisemem: ...``, and an exit code: 2 for bad input (a spec, an argument, a
path that holds no study), 1 for a run that failed or a store that is incomplete or
damaged; ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from noisemem.studies.spec import GPU_MODES, SpecError, StudySpec
from noisemem.studies.store import IncompleteStoreError, StoreError

BAD_INPUT, FAILED = 2, 1


class Failed(RuntimeError):
    """A run or a check that failed (exit 1), with its one-line message."""


def _spec(args: argparse.Namespace) -> StudySpec:
    spec = StudySpec.from_toml(args.spec)
    overrides = {"output": getattr(args, "output", None), "gpu": getattr(args, "gpu", None)}
    return spec.with_overrides(Path(args.spec).parent, **overrides)


def comparison(path: str) -> str:
    """A store's comparison, as text: the Monte Carlo E[M] at each fixed point against the
    exact expectation and the full-batch prediction there; and each run's M at its own
    parameters after each epoch (no single prediction there: per-run cosines, averaged)."""
    from noisemem.analysis.compare import comparison_table, epoch_summary, is_fixed
    from noisemem.studies.tables import load

    tables = load(path)
    table = comparison_table(tables)
    if len(table):
        table = table[[is_fixed(p) for p in table["probe"]]]
    text = [
        "E[M] at fixed points (Monte Carlo vs the exact expectation, the full-batch and the "
        "noise-aware predictions):"
    ]
    text.append(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    epochs = epoch_summary(tables)
    if len(epochs):
        text += ["", "M at each run's own parameters after each epoch (means over runs):"]
        text.append(epochs.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return "\n".join(text)


#: set in the environment of a ``ray job submit`` entrypoint (by Ray's job supervisor)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def refuse_relative_output_in_a_job(args: argparse.Namespace, spec: StudySpec) -> None:
    """Under ``ray job submit`` the entrypoint runs in Ray's temporary copy of the working
    directory on the head node: a relative output (and the report in it) would go there and
    be lost with it."""
    import os

    if RAY_JOB_ENV not in os.environ:
        return
    written = args.output if args.output is not None else spec.raw.get("output")
    if written is None or "://" in str(written) or Path(str(written)).expanduser().is_absolute():
        return
    raise ValueError(
        f"output={written!r} is relative, and under ray job submit the job runs in Ray's "
        "temporary copy of the working directory, which is deleted with the job: give an "
        "absolute path (or ~/...) or a URI such as s3://bucket/study, in the spec or with "
        "--output"
    )


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    refuse_relative_output_in_a_job(args, spec)
    if args.report_dir is not None:
        from noisemem.studies.prepare import check_writable_dir

        check_writable_dir("--report-dir", args.report_dir)
    from noisemem.studies import driver  # imports Ray (starts none): only where a study runs

    handle = driver.launch(spec, actors=args.actors)  # checks all it can before Ray starts
    try:
        path = handle.wait()
    except (IncompleteStoreError, driver.StudyActorError, driver.StudyInterrupted) as err:
        raise Failed(str(err)) from err
    except driver.ray.exceptions.RayError as err:  # retries spent: the driver's note says so
        notes = getattr(err, "__notes__", None) or [str(err).strip().splitlines()[0]]
        raise Failed(notes[-1]) from err
    print(comparison(path))
    from noisemem.analysis.report import write_report

    copy = None if args.report_dir is None else Path(args.report_dir) / spec.name
    report = write_report(path, copy)
    print(f"\nstore: {path}\nreport: {report}")
    if copy is not None:
        print(f"report copy: {(copy / 'report.html').resolve()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from noisemem.analysis.report import write_report
    from noisemem.studies.tables import open_manifest

    open_manifest(args.path)  # one clear line for a path that holds no study
    if args.out_dir is not None:
        from noisemem.studies.prepare import check_writable_dir

        check_writable_dir("--out-dir", args.out_dir)
    print(write_report(args.path, args.out_dir))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from noisemem.studies.tables import inspect, load

    found = inspect(args.path)
    runs = load(args.path).runs
    m = found.manifest
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    print(f"study {m['study']} ({args.path}): complete={found.complete}")
    print(f"runs: {len(runs)} of {len(m['configs']) * m['permutations']} ({counts})")
    print(found.summary())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from noisemem.studies.tables import inspect

    found = inspect(args.path)
    for problem in found.problems:
        print(problem)
    print(found.summary())
    if not found.complete:
        raise Failed(
            f"{args.path}: {len(found.problems)} item(s) missing, failed or damaged; "
            "`noisemem run` of its spec computes exactly those again"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from noisemem.studies.tables import inspect

    found = inspect(args.path)
    print(comparison(args.path))
    if not found.complete:
        print(
            f"noisemem: warning: {args.path} is incomplete ({found.summary()}); the table is "
            "over the finished chunks only (`noisemem verify` lists the rest)",
            file=sys.stderr,
        )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from noisemem.studies.validate import describe

    print(describe(_spec(args)))
    return 0


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "verify": cmd_verify,
    "show": cmd_show,
    "validate": cmd_validate,
    "report": cmd_report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noisemem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study spec (TOML) on the current Ray cluster")
    run.add_argument("spec")
    run.add_argument(
        "--actors", type=int, default=None, help="override runtime.actors (0: one per CPU/GPU)"
    )
    run.add_argument(
        "--output",
        default=None,
        help="override the spec's output location (a path, made absolute here, or a URI); "
        "on a multi-node cluster it must be storage every node shares, e.g. s3://bucket/study",
    )
    run.add_argument(
        "--gpu", choices=GPU_MODES, default=None, help="override runtime.gpu (auto|never|always)"
    )
    run.add_argument(
        "--report-dir", default=None, help="also write a copy of the report into DIR/<name>"
    )
    for name, text in (
        ("status", "what a study store holds (from its parts, checked)"),
        ("verify", "check every part of a store; list what is missing or damaged"),
        ("show", "print a study's comparison table"),
    ):
        sub.add_parser(name, help=text).add_argument("path")
    report = sub.add_parser(
        "report", help="write report.html and summary.parquet into a store (and a copy)"
    )
    report.add_argument("path")
    report.add_argument("--out-dir", default=None, help="also write copies here")
    validate = sub.add_parser(
        "validate", help="check a spec; print its configs, runs and a cost estimate (no Ray)"
    )
    validate.add_argument("spec")
    validate.add_argument("--output", default=None, help="override the spec's output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SpecError, StoreError, ValueError) as err:
        return _fail(args, err, BAD_INPUT)
    except (Failed, IncompleteStoreError, OSError) as err:
        return _fail(args, err, FAILED)
    except KeyboardInterrupt:
        print("noisemem: interrupted; a study's store can be resumed", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: say what, and where to look
        print(
            f"noisemem: internal error: {type(err).__name__}: {err} (run with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        if args.debug:
            traceback.print_exc()
        return FAILED


def _fail(args: argparse.Namespace, err: BaseException, code: int) -> int:
    print(f"noisemem: {' '.join(str(err).split())}", file=sys.stderr)
    if args.debug:
        traceback.print_exc()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
