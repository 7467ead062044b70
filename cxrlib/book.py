"""What makes an executed chapter read like a published one: the data banner, and a tidy notebook
(parameter cells removed from the page, no progress-bar widgets)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import nbformat
from IPython.display import HTML
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]  # the repository (cxrlib is installed editable: `pip install -e .`)
HIDDEN_TAGS = ("parameters", "injected-parameters")  # papermill's tags; Jupyter Book removes `remove-cell`
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def repo_path(*parts: str) -> Path:
    """A path in the repository, absolute: a chapter's default folders land in the repository whether papermill
    or Jupyter runs it from notebooks/ or from the repository root."""
    return ROOT.joinpath(*parts)


def banner(text: str, kind: str = "note") -> HTML:
    """A Markdown sentence as an admonition box that renders in Jupyter and in the book.

    Raw HTML, because myst-nb does not parse MyST in Markdown outputs. The title is the text's
    leading bold span ("**Data: synthetic.** ...") or else its first sentence.
    """
    match = re.match(r"\s*\*\*(.+?)\*\*\s*(.*)", text, re.S) or re.match(r"\s*(.+?\.)\s+(.*)", text, re.S)
    title, body = (match.group(1), match.group(2)) if match else (text, "")
    body_html = MarkdownIt().render(body) if body else ""
    return HTML(f'<div class="admonition {html.escape(kind)}">\n<p class="admonition-title">{html.escape(title)}</p>\n'
                f"{body_html}</div>")


def tidy_notebook(path: str | Path) -> Path:
    """After papermill: tag parameter cells `remove-cell` and drop widget outputs and widget state.

    Progress bars (tqdm in a kernel with ipywidgets) are widget outputs: on a static page they show as
    "HBox(...)" text, so they go. Idempotent; rewrites the file in place.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if any(t in tags for t in HIDDEN_TAGS) and "remove-cell" not in tags:
            tags.append("remove-cell")
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET_MIME not in o.get("data", {})]
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return path
