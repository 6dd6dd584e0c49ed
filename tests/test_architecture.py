"""The house: the engine never reaches the service, the analysis or Ray; Ray lives only in
the service's worker and driver; nothing below the front door imports the analysis."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "noisemem"
ENGINE = sorted(p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "cli.py"))
SERVICE = sorted((PACKAGE / "studies").glob("*.py"))
ANALYSIS = sorted((PACKAGE / "analysis").glob("*.py"))
HEAVY = ("ray", "pyarrow", "pandas")


def imported(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, wherever it stands (inside
    functions and ``if TYPE_CHECKING:`` too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def reaches(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


def test_the_rooms_are_where_the_layout_says():
    assert {p.stem for p in ENGINE} >= {
        "optim", "problem", "probe", "window", "memory", "correction", "fused",
        "expectation", "full_batch", "noise", "trajectory", "stats", "checks",
    }  # fmt: skip
    assert {p.stem for p in SERVICE} >= {
        "spec", "data", "models", "plan", "chunk", "rows", "schema", "store",
        "devices", "worker", "driver",
    }  # fmt: skip
    assert {p.stem for p in ANALYSIS} >= {"compare", "report"}


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: p.name)
def test_the_engine_imports_neither_the_service_nor_heavy_libraries(path):
    names = imported(path)
    assert not reaches(names, HEAVY), path
    assert not reaches(names, ("noisemem.studies", "noisemem.analysis", "noisemem.cli")), path


@pytest.mark.parametrize("path", SERVICE, ids=lambda p: p.name)
def test_ray_only_in_the_worker_and_the_driver_and_no_analysis_in_the_service(path):
    names = imported(path)
    if path.stem not in ("worker", "driver"):
        assert not reaches(names, ("ray",)), path
    assert not reaches(names, ("noisemem.analysis", "noisemem.cli")), path


@pytest.mark.parametrize("path", ANALYSIS, ids=lambda p: p.name)
def test_the_analysis_reads_stores_without_ray(path):
    names = imported(path)
    assert not reaches(names, ("ray", "noisemem.studies.driver", "noisemem.studies.worker"))
    assert not reaches(names, ("noisemem.cli",)), path


def test_importing_the_engine_loads_no_heavy_library():
    modules = ", ".join(f"noisemem.{p.stem}" for p in ENGINE)
    code = (
        f"import sys, noisemem, {modules}; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY!r} or m.startswith(('noisemem.studies', 'noisemem.analysis'))]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
