"""The ``noisemem`` command: ``run`` a study, ``status`` of a store, ``show`` its comparison."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from noisemem.spec import SpecError, StudySpec


def comparison(path: str) -> str:
    """The comparison table of a store, as text (Monte Carlo vs exact vs full-batch)."""
    from analysis.study_report import comparison_table
    from noisemem.store import load

    table = comparison_table(load(path))
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noisemem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study spec (TOML) on the current Ray cluster")
    run.add_argument("spec")
    run.add_argument("--actors", type=int, default=None, help="override runtime.actors")
    run.add_argument("--output", default=None, help="override the spec's output location")
    run.add_argument("--report-dir", default="out/reports", help="where report.md goes")
    status = sub.add_parser("status", help="what a study store holds")
    status.add_argument("path")
    show = sub.add_parser("show", help="print a study's comparison table")
    show.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "run":
        from noisemem.runtime import launch

        try:
            spec = StudySpec.from_toml(args.spec)
            if args.output:
                import dataclasses

                spec = dataclasses.replace(spec, output=args.output)
            handle = launch(spec, actors=args.actors)
        except (SpecError, ValueError) as err:
            print(f"noisemem: {err}", file=sys.stderr)
            return 2
        path = handle.wait()
        print(comparison(path))
        from analysis.study_report import write_report
        from noisemem.store import load

        report = write_report(load(path), Path(args.report_dir) / spec.name)
        print(f"\nstore: {path}\nreport: {report.resolve()}")
        return 0
    if args.command == "status":
        from noisemem.store import load

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
