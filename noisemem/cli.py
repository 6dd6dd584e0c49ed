"""The ``noisemem`` command: ``run`` a study, ``status`` of a store, ``show`` its comparison.

The front door: it reads specs and stores (:mod:`noisemem.studies`), runs studies on Ray
(:mod:`noisemem.studies.driver`, imported when a study runs) and shows what the analysis
(:mod:`noisemem.analysis`) makes of a store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from noisemem.analysis.compare import comparison_table
from noisemem.analysis.report import write_report
from noisemem.studies.spec import GPU_MODES, SpecError, StudySpec
from noisemem.studies.store import IncompleteStoreError
from noisemem.studies.tables import load


def comparison(path: str) -> str:
    """The comparison table of a store, as text (Monte Carlo vs exact vs full-batch)."""
    table = comparison_table(load(path))
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noisemem", description=__doc__)
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
    run.add_argument("--report-dir", default="out/reports", help="where report.md goes")
    status = sub.add_parser("status", help="what a study store holds")
    status.add_argument("path")
    show = sub.add_parser("show", help="print a study's comparison table")
    show.add_argument("path")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "run":
        from noisemem.studies import driver  # imports Ray: only where a study runs

        try:
            spec = StudySpec.from_toml(args.spec)
            spec = spec.with_overrides(Path(args.spec).parent, output=args.output, gpu=args.gpu)
            handle = driver.launch(spec, actors=args.actors)
        except (SpecError, ValueError) as err:
            print(f"noisemem: {err}", file=sys.stderr)
            return 2
        try:
            path = handle.wait()
        except (IncompleteStoreError, driver.StudyActorError) as err:
            print(f"noisemem: {err}", file=sys.stderr)
            return 1
        print(comparison(path))
        report = write_report(load(path), Path(args.report_dir) / spec.name)
        print(f"\nstore: {path}\nreport: {report.resolve()}")
        return 0
    if args.command == "status":
        tables = load(args.path)
        runs = tables.runs
        counts = runs["status"].value_counts().to_dict() if len(runs) else {}
        m = tables.manifest
        print(f"study {m['study']} ({args.path}): complete={m.get('complete')}")
        print(f"runs: {len(runs)} of {len(m['configs']) * m['permutations']} ({counts})")
        return 0
    print(comparison(args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
