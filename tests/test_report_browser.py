"""The report of the batch-size sweep in a real browser: headless Chromium, driven by
Playwright (the system Chromium, ``executable_path``), loads every image and shows every
table. Skipped only where no Chromium is installed (``.ci/run`` installs one)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import stores

from noisemem.analysis.report import write_report
from noisemem.studies.store import Store

#: the tables a batch-size sweep's report must show
MUST = {
    "claims-table", "status-table", "agreement", "prediction-fits", "noise-parts",
    "batch-size", "epoch-corrections", "versions-table", "columns-moments",
}  # fmt: skip
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """NOISEMEM_CHROMIUM, else the first Chromium on PATH."""
    given = os.environ.get("NOISEMEM_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason=f"no Chromium found (none of {', '.join(CANDIDATES)} on PATH, NOISEMEM_CHROMIUM "
    "unset): apt-get install chromium",
)


def test_the_report_opens_with_every_image_and_table(tmp_path_factory, tmp_path):
    from playwright.sync_api import sync_playwright

    uri = stores.ready("batch_size_sweep", tmp_path_factory.getbasetemp())
    write_report(uri)
    page_html = Store(uri).read_text("report.html")
    expected_tables = set(re.findall(r'<table id="([^"]+)"', page_html))
    expected_images = page_html.count("<img ")
    assert MUST <= expected_tables
    assert expected_images >= 4  # E[M] by coordinate, the batch-size curves, loss, convergence
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(Path(f"{uri}/report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "[...document.images].map(i => [i.alt, i.complete, i.naturalWidth])"
            )
            tables = page.evaluate(
                "[...document.querySelectorAll('table')].map(t => [t.id, t.tBodies[0].rows.length,"
                " t.getBoundingClientRect().width])"
            )
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(images) == expected_images
    assert all(complete and width > 0 for _, complete, width in images), images
    shown = {t[0]: t for t in tables}
    assert set(shown) == expected_tables
    assert all(rows >= 1 and width > 0 for _, rows, width in tables), tables
    assert shot.stat().st_size > 10_000
