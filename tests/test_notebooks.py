"""Every study notebook in analysis/ runs top to bottom (nbclient, a real kernel) against a
shrunken version of its study, made here without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import stores
from nbclient import NotebookClient

from noisemem.studies.store import Store

NOTEBOOKS = Path(__file__).resolve().parents[1] / "analysis"
READY = sorted(p.stem for p in stores.STUDIES.glob("*.toml"))


def test_every_ready_study_has_a_notebook():
    assert READY and all((NOTEBOOKS / f"{name}.ipynb").exists() for name in READY)


@pytest.mark.parametrize("name", READY)
def test_notebook_runs_on_its_study(name, tmp_path_factory, monkeypatch):
    uri = stores.ready(name, tmp_path_factory.getbasetemp())
    monkeypatch.setenv("NOISEMEM_STORE", uri)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={
        "metadata": {"path": str(NOTEBOOKS)}}).execute()  # fmt: skip
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"report: {uri}/report.html" in text
    assert "0 missing, failed or damaged items" in text
    assert Store(uri).exists("report.html")
    # the DuckDB cell counted every run of the store
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert tables, "no table shown"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "no figure shown"
    manifest = json.loads(Store(uri).read_text("manifest.json"))
    assert manifest["study"] == name
