"""Self-contained HTML: tables from frames (intervals shown as ``value [low, high]``),
figures as base64 ``data:`` images, Markdown tables (the column reference) as HTML."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.82em; }
th, td { border: 1px solid #d0d0d0; padding: 3px 6px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0; }
.supported { background: #e3f4e1; } .contradicted { background: #fbe3e1; }
.mixed, .inconclusive { background: #fdf3d8; } .measured, .not-measured { background: #f4f4f4; }
.wrap { overflow-x: auto; } figure { margin: 1em 0 2em; } figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; max-width: 70em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.note { color: #555; font-size: 0.9em; } nav a { margin-right: 1em; }
"""

NAN_TEXT = "–"


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def number(value: Any, digits: int = 4) -> str:
    """A number for a table: 4 significant digits, integers as they are, NaN as a dash."""
    if value is None:
        return NAN_TEXT
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if not math.isfinite(v):
            return NAN_TEXT if math.isnan(v) else ("∞" if v > 0 else "−∞")
        if v == 0:
            return "0"
        if v.is_integer() and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.{digits}g}"
    return str(value)


def interval(value: Any, low: Any, high: Any) -> str:
    """``value [low, high]`` (the interval left out when it is not finite)."""
    text = number(value)
    if isinstance(low, float | np.floating) and isinstance(high, float | np.floating):
        if math.isfinite(low) and math.isfinite(high):
            return f"{text} [{number(low, 3)}, {number(high, 3)}]"
    return text


def with_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """``x``, ``x_low``, ``x_high`` folded into one text column ``x`` (95% interval)."""
    out = {}
    for col in frame.columns:
        if col.endswith(("_low", "_high")) and col.rsplit("_", 1)[0] in frame.columns:
            continue
        if f"{col}_low" in frame.columns and f"{col}_high" in frame.columns:
            out[col] = [
                interval(v, lo, hi)
                for v, lo, hi in zip(
                    frame[col], frame[f"{col}_low"], frame[f"{col}_high"], strict=True
                )
            ]
        else:
            out[col] = [number(v) for v in frame[col]]
    return pd.DataFrame(out, columns=list(out))


def table(
    frame: pd.DataFrame,
    table_id: str,
    caption: str,
    *,
    text_columns: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    limit: int = 500,
) -> str:
    """An HTML table of ``frame`` (intervals folded), ``id=table_id``; ``classes`` (one per
    row) colours rows; at most ``limit`` rows, the rest counted below it."""
    shown = with_intervals(frame.head(limit))
    text = {c for c in shown.columns if c in text_columns or frame[c].dtype == object}
    head = "".join(
        f'<th class="{"text" if c in text else "num"}">{esc(c)}</th>' for c in shown.columns
    )
    body = []
    for i, row in enumerate(shown.itertuples(index=False)):
        cls = f' class="{esc(classes[i])}"' if classes is not None else ""
        cells = "".join(
            f'<td class="{"text" if c in text else "num"}">{esc(v)}</td>'
            for c, v in zip(shown.columns, row, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    more = ""
    if len(frame) > limit:
        more = f'<p class="note">{len(frame) - limit} more rows in summary.parquet.</p>'
    return (
        f'<div class="wrap"><table id="{esc(table_id)}"><caption>{esc(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{more}"
    )


def grouped_table(
    frame: pd.DataFrame,
    table_id: str,
    caption: str,
    group: Sequence[str],
    *,
    classes: Sequence[str] | None = None,
) -> str:
    """An HTML table of text ``frame`` whose ``group`` columns span the consecutive rows
    they are equal in (a claim stated once beside its rows); ``classes`` colours rows."""
    cols = list(frame.columns)
    head = "".join(f'<th class="text">{esc(c)}</th>' for c in cols)
    values = frame.astype(str).to_numpy()
    keys = [tuple(frame[g].astype(str)) for g in group]
    key_rows = list(zip(*keys, strict=True)) if keys else [() for _ in range(len(frame))]
    body = []
    for i in range(len(frame)):
        first = i == 0 or key_rows[i] != key_rows[i - 1]
        span = 1
        while first and i + span < len(frame) and key_rows[i + span] == key_rows[i]:
            span += 1
        cells = []
        for j, c in enumerate(cols):
            if c in group:
                if first:
                    cells.append(f'<td class="text" rowspan="{span}">{esc(values[i, j])}</td>')
                continue
            cell_class = f"text {esc(classes[i])}" if classes is not None else "text"
            cells.append(f'<td class="{cell_class}">{esc(values[i, j])}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="wrap"><table id="{esc(table_id)}"><caption>{esc(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def image(data: bytes, alt: str, caption: str, figure_id: str) -> str:
    """A PNG embedded as a base64 data URI, with its caption."""
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<figure id="{esc(figure_id)}"><img alt="{esc(alt)}" '
        f'src="data:image/png;base64,{encoded}"><figcaption>{esc(caption)}</figcaption></figure>'
    )


def paragraphs(lines: Iterable[str], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return "".join(f"<p{attr}>{esc(line)}</p>" for line in lines)


def items(lines: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"


_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", esc(text))


def markdown_tables(markdown: str, id_prefix: str) -> str:
    """The ``### heading`` + pipe-table Markdown of ``schema.reference()`` as HTML tables
    (``id = id_prefix + heading``)."""
    out: list[str] = []
    rows: list[list[str]] = []
    name = ""

    def flush() -> None:
        if not rows:
            return
        head, *body = rows
        ths = "".join(f'<th class="text">{_inline(c)}</th>' for c in head)
        trs = "".join(
            "<tr>" + "".join(f'<td class="text">{_inline(c)}</td>' for c in r) + "</tr>"
            for r in body
        )
        ident = esc(f"{id_prefix}{name}")
        out.append(
            f'<div class="wrap"><table id="{ident}"><caption>{_inline(name)}</caption>'
            f"<thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table></div>"
        )
        rows.clear()

    for line in markdown.splitlines():
        if line.startswith("#"):
            flush()
            name = line.lstrip("#").strip().strip("`")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= {"-", ":"} for c in cells):
                continue
            rows.append(cells)
        else:
            flush()
    flush()
    return "".join(out)


def document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>"
    )
