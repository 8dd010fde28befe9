"""Building blocks of the report page: escaping, tables, embedded images, style and script.

Every value read from an input folder goes through ``esc`` (or a helper that calls it): model
output, file names and summary fields are untrusted text.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable
from dataclasses import dataclass


def esc(x) -> str:
    return html.escape(str(x), quote=True)


@dataclass
class Context:
    """What every section reads: runs, groups (summary.Group), [(label, Run with analysis)],
    objective -> colour, and ``rel`` (a path as the page shows it)."""

    runs: list
    groups: list
    analyses: list
    colors: dict
    rel: Callable = str


def img(png: bytes | None, alt: str, cls: str = "") -> str:
    if not png:
        return ""
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def table(head: list, rows: list[list], cls: str = "sortable", row_attrs: list[str] | None = None) -> str:
    """Header cells are escaped here; body cells are HTML the caller built (escaped there)."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    attrs = row_attrs or [""] * len(rows)
    trs = "".join(f"<tr{a}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row, a in zip(rows, attrs))
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def details(summary: str, body: str, open_: bool = False) -> str:
    if not body:
        return ""
    return f"<details{' open' if open_ else ''}><summary>{summary}</summary>{body}</details>"


def swatch(name: str, colors: dict) -> str:
    """An objective's name with its colour (the same as its lines and bars)."""
    c = colors.get(name, "#7f7f7f")
    return f'<span class="sw" style="background:{esc(c)}"></span>{esc(name)}'


def fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else esc(v)


def pct(v, digits: int = 1) -> str:
    return "" if v is None else f"{100 * v:.{digits}f}"


def relpath_value(v, rel: Callable):
    """An absolute path among config values, shown relative to the page's folder."""
    if isinstance(v, str) and os.path.isabs(v):
        return rel(v)
    return v


CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em 2em;max-width:1200px;color:#222;
font-size:15px;line-height:1.4}h1{font-size:1.5em;margin:.2em 0}h2{margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
h3{margin:.6em 0 .3em;font-size:1.05em}.meta{color:#666;margin:.2em 0 .6em;font-size:13px}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f0f0f0;cursor:pointer}td small{color:#666}img{max-width:100%;margin:4px 0}.grid{display:flex;flex-wrap:wrap}
.grid img{width:49%}.sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:-1px}
#summary{background:#eef4fb;border:1px solid #c8d9ee;border-radius:6px;padding:.5em 1em .7em;margin:.4em 0 1em}
#summary h2{margin:.2em 0 .3em;border:0}#summary table{background:#fff;margin:.2em 0}
.groups{display:flex;flex-wrap:wrap;gap:0 1.5em}.group{flex:1 1 460px;max-width:700px}.note{color:#555;font-size:12.5px;margin:.3em 0}
.findings{margin:.3em 0 .5em;padding-left:1.2em;font-size:14px}.findings li{margin:.15em 0}
.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}
details{margin:.5em 0}summary{cursor:pointer;color:#1f4e8c}.box{border:1px solid #ddd;border-radius:5px;padding:.4em .8em;
margin:.3em 0;flex:1 1 420px;font-size:13.5px}.ex{border-left:4px solid #bbb;padding:.2em .7em;margin:.6em 0}
.ex.ok{border-color:#1a7f37}.ex.bad{border-color:#c62828}pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;
padding:.4em .6em;margin:.3em 0;font-size:12.5px}pre.prompt{max-height:9em;overflow:auto;color:#555}
mark{background:#ffe58a;padding:0 .1em}.verdict{font-weight:600}.verdict.ok{color:#1a7f37}.verdict.bad{color:#c62828}
code{font-size:12.5px}"""

JS = """document.querySelectorAll('table.sortable th').forEach(function(th, i){th.addEventListener('click', function(){
var tb=th.closest('table').tBodies[0];var rows=Array.from(tb.rows);var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort(function(a,b){var x=parseFloat(a.cells[i].textContent),y=parseFloat(b.cells[i].textContent);
if(isNaN(x)||isNaN(y)){x=a.cells[i].textContent;y=b.cells[i].textContent;}return (x>y?1:x<y?-1:0)*(asc?1:-1);});
rows.forEach(function(r){tb.appendChild(r);});});});"""
