"""One self-contained HTML page: inline CSS, PNGs embedded as data URIs, no script, nothing fetched.

The page opens offline, from an e-mail attachment or a CI artifact store; each image also links to
its PNG beside the page by a relative name.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.artifacts import write_atomic

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1300px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.8rem; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.facts th { color: #555; font-weight: normal; }
.figs { display: flex; flex-wrap: wrap; gap: 1.5rem; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
footer { margin-top: 3rem; color: #888; font-size: 0.8rem; }
"""


@dataclass
class Plot:
    title: str
    path: Path  # a PNG beside the page
    caption: str = ""


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # column indices to right-align


@dataclass
class Page:
    title: str
    subtitle: str
    facts: list[tuple[str, str]]  # the summary figures, label -> formatted value
    plots: list[Plot] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. why a plot is missing
    texts: list[tuple[str, str]] = field(default_factory=list)  # (title, verbatim text) shown folded


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _img(plot: Plot) -> str:
    data = base64.b64encode(Path(plot.path).read_bytes()).decode("ascii")
    name = Path(plot.path).name
    caption = f"{_e(plot.caption)} " if plot.caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(plot.title)}">'
        f'<figcaption><b>{_e(plot.title)}</b>. {caption}(<a href="{_e(name)}">{_e(name)}</a>)</figcaption></figure>'
    )


def _table(table: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = "".join(f'<td class="num">{_e(c)}</td>' if i in table.numeric else f"<td>{_e(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<h2>{_e(table.title)}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(page: Page) -> str:
    """The page as one HTML string."""
    from llmctl import __version__

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(page.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(page.title)}</h1>",
        f'<p class="sub">{_e(page.subtitle)}</p>',
    ]
    if page.facts:
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in page.facts)
        parts.append(f'<table class="facts">{rows}</table>')
    if page.plots:
        parts.append("<h2>Plots</h2>")
        parts.append('<div class="figs">' + "\n".join(_img(p) for p in page.plots) + "</div>")
    for note in page.notes:
        parts.append(f'<p class="sub">{_e(note)}</p>')
    parts.extend(_table(t) for t in page.tables)
    for title, text in page.texts:
        parts.append(f"<h2>{_e(title)}</h2><details><summary>show</summary><pre>{_e(text)}</pre></details>")
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts.append(f"<footer>written by llmctl {_e(__version__)} report, {_e(when)}</footer>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(path: Path, page: Page) -> Path:
    """Write `page` to `path` (atomically) and return the path."""
    write_atomic(path, render(page))
    return path
