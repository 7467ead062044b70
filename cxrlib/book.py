"""What makes an executed chapter read like a published one: its parameters checked (`chapter_parameters`), what
it shows when given no run (`default_run_root`, `featured_run`, `chest_pretraining`), the banners, numbered
tables that read (`Tables`), a tidy notebook (parameter cells removed from the page, no progress-bar widgets),
and launch buttons that open a notebook the repository holds (`setup`, a Sphinx extension)."""

from __future__ import annotations

import ast
import difflib
import html
import math
import numbers
import re
import typing
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
from IPython.display import HTML
from markdown_it import MarkdownIt

from .config import SYNTHETIC_TAG, RunConfig, data_banner, data_sources, type_name, typed_value
from .errors import CXRError
from .paths import NOTEBOOKS, ROOT

HIDDEN_TAGS = ("parameters", "injected-parameters")  # papermill's tags; Jupyter Book removes `remove-cell`
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
GENERATED, PAIRED = "book/generated/", "notebooks/"  # where the book's chapters are executed / the tracked notebooks
# Inline so that a table reads the same in Jupyter and in the built book: cells wrap at spaces and long tokens
# at their <wbr> (`_breakable`), so a table fits a 420 px phone; the wrapper scrolls sideways only as a last resort.
# Not `overflow-wrap: anywhere`: it lets the table shrink short words to a letter a line ("pneumoni|a").
TABLE_CSS = """<style>
.cxr-table-wrap { max-width: 100%; overflow-x: auto; margin: 0.5em 0 1.2em; }
.cxr-table { border-collapse: collapse; max-width: 100%; font-size: 0.9em; }
.cxr-table caption, .cxr-table-wrap .cxr-caption { caption-side: top; text-align: left; padding: 0 0 0.4em; }
.cxr-table th, .cxr-table td { padding: 0.25em 0.6em; text-align: left; vertical-align: top;
  word-wrap: break-word; overflow-wrap: break-word; border-bottom: 1px solid #ccc; }
.cxr-table th { border-bottom: 2px solid #888; }
.cxr-table td.cxr-num { text-align: right; font-variant-numeric: tabular-nums; }
@media (max-width: 600px) { .cxr-table { font-size: 0.78em; } .cxr-table th, .cxr-table td { padding: 0.2em 0.3em; } }
</style>"""


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
    title_html = MarkdownIt().renderInline(title)  # `code` in a title renders as code (escaped like the body)
    return HTML(f'<div class="admonition {html.escape(kind)}">\n<p class="admonition-title">{title_html}</p>\n'
                f"{body_html}</div>")


def chapter_parameters(namespace: dict[str, Any], chapter: str, fields: type | None = None) -> dict[str, Any]:
    """The parameters of `chapter` (its parameters cell's names, and the fields of the dataclass `fields`) as this
    execution has them in `namespace` (the chapter's globals()), each of its type. A name papermill injected that
    is neither (`-p los focal`), or a value of the wrong type (`-p image_size abc`), is one CXRError naming it and
    what it should be, before the chapter does any work; papermill itself only warns of the first and passes the
    second on."""
    declared, own = chapter_names(chapter)
    kinds = {**{k: type(v) for k, v in declared.items() if v is not None},
             **(typing.get_type_hints(fields) if fields else {})}
    known = set(declared) | set(kinds)
    unknown = sorted(k for k, v in namespace.items() if _injected(k, v) and k not in known and k not in own)
    if unknown:
        raise CXRError("; ".join(f"{chapter} has no parameter {k!r}" + _nearest(k, known) for k in unknown))
    values = {}
    for name in sorted(known & set(namespace)):
        value = namespace[name]
        try:
            values[name] = None if value is None else typed_value(kinds.get(name), value)
        except ValueError as err:
            raise CXRError(f"{chapter}: parameter {name}={value!r} is not of type {type_name(kinds[name])}") from err
    return values


def chapter_names(chapter: str, folder: Path = NOTEBOOKS) -> tuple[dict[str, Any], set[str]]:
    """The names and defaults the chapter's parameters cell sets (a default that is not a literal reads None), and
    every name its other cells bind (a chapter run again in one kernel has them; papermill never injects them)."""
    from IPython.core.inputtransformer2 import TransformerManager  # the cells' magics as Python

    declared: dict[str, Any] = {}
    own: set[str] = set()
    for cell in nbformat.read(Path(folder) / f"{chapter}.ipynb", as_version=4).cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(TransformerManager().transform_cell(cell.source))
        if "parameters" in cell.metadata.get("tags", []):
            for node in tree.body:
                target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
                if isinstance(target, ast.Name) and node.value is not None:
                    declared[target.id] = _literal(node.value)
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.alias):
                own.add(node.asname or node.name.split(".")[0])
    return declared, own


def _literal(node: ast.expr) -> Any:
    """A parameter's default, whose type is the parameter's; None (any type) when it is an expression."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _injected(name: str, value: Any) -> bool:
    """Whether a global could be a parameter papermill injected: a public name bound to a literal (what papermill
    writes), not IPython's own (In, Out, _i1, ...)."""
    return not name.startswith("_") and name not in ("In", "Out") and type(value) in (
        type(None), bool, int, float, str, list, dict)


def _nearest(name: str, known: set[str]) -> str:
    """": did you mean 'loss'?" for a misspelt parameter, else the parameters there are."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f": did you mean {close[0]!r}?" if close else f" (its parameters: {', '.join(sorted(known))})"


def banner_from_record(path: str | Path) -> str:
    """The banner of a run folder, or of a run root (all its runs must share one data record), from what the
    runs recorded in params.json: the data, then the profile, image size and epochs."""
    from .rundir import find_runs

    path = Path(path)
    records = [run.record for run in find_runs(path, status=None) if "record" in run.data]
    if not records:
        raise CXRError(f"no run folder with a data record in {path}: run `python -m cxrlib.runs` (or train) first")
    data = {r["data"]["record"]["fingerprint"]: r["data"]["record"]  # a debiased run's record names its extra data
            for r in sorted(records, key=lambda r: "extra_negatives" in r["data"]["record"])}
    if len(data) > 1:
        raise CXRError(f"{path} mixes runs of different data ({', '.join(d['tag'] for d in data.values())}); "
                       "give one data set's run root")
    settings = sorted({(r["config"]["profile"], r["config"]["image_size"], r["config"]["epochs"]) for r in records})
    runs_text = "; ".join(f"profile `{p}`, {size} px, {epochs} epoch(s)" for p, size, epochs in settings)
    return f"{data_banner(next(iter(data.values())))}\n\n*Recorded by {len(records)} run(s): {runs_text}.*"


def run_banner(run_dir: str | Path) -> str:
    """What a run folder trained, in words for the banner under the data's (chapter 3): task, loss, initialisation,
    seed, any departure from the paper's set-up, profile, image size and epochs run, as its params.json and
    metrics.json recorded them, never as the notebook's parameters say."""
    from .generalise import arm_label, run_words
    from .results import PAPER_ARM
    from .rundir import Run

    run = Run(run_dir)
    config, metrics = run.config, run.metrics(missing_ok=True)
    arm = arm_label(config)
    epochs = (f"{metrics['epochs_run']} of at most {config['epochs']} epoch(s) run, the model of epoch "
              f"{metrics['best_epoch']} kept" if "epochs_run" in metrics else f"at most {config['epochs']} epoch(s)")
    return (f"**Run: {run_words(config)}{'' if arm == PAPER_ARM else f' ({arm})'}.** Profile "
            f"`{config['profile']}`, {config['image_size']} px images, {epochs}.")


# --- what a chapter shows when given no run ------------------------------------------------------


def default_run_root(profile: str, coronahack_dir: str = "", extra_covid_dir: str = "", manifest: str = "",
                     base: str | Path | None = None) -> Path:
    """runs/<profile>/<data tag> (under `base`, the repository): where the chapters look when given no run_root.
    The tag is what the runs there recorded for these data folders; the data are read (to fingerprint them) only
    when no run, or runs of two versions of the data, recorded them."""
    from .rundir import find_runs, run_root

    sources = data_sources(coronahack_dir, extra_covid_dir, manifest)
    if not sources:
        return run_root(profile, SYNTHETIC_TAG, base)

    def resolved(folders: dict[str, str]) -> dict[str, Path]:
        return {name: Path(folder).resolve() for name, folder in folders.items()}

    records = [run.data["record"] for run in find_runs(run_root(profile, "", base), status=None) if "record" in run.data]
    tags = {record["tag"] for record in records if resolved(record.get("sources", {})) == resolved(sources)}
    if len(tags) == 1:
        return run_root(profile, tags.pop(), base)
    from .train import load_data

    cfg = RunConfig(coronahack_dir=coronahack_dir or "", extra_covid_dir=extra_covid_dir or "", manifest=manifest or "")
    return run_root(profile, load_data(cfg).record["tag"], base)


def featured_run(run_root: str | Path) -> Path | None:
    """The run chapters 3 and 4 show: 3-class, focal loss, with the extra COVID images, preferring the
    chest-X-ray init as in the paper, by the parameters each run recorded (never its folder name)."""
    from .results import load_runs

    runs = load_runs(run_root)
    if runs.empty:
        return None
    done = runs[(runs.status == "complete") & runs.paper_arm & runs.extra_covid_train.map(bool)]
    for prefer in (lambda r: ~r.weights.isin(["none", "imagenet"]), lambda r: r.weights == "imagenet",
                   lambda r: r.weights == "none"):
        pick = done[(done.task == "multiclass") & (done.loss == "focal") & prefer(done)]
        if not pick.empty:
            return Path(pick.iloc[0].run_dir)
    return Path(done.iloc[0].run_dir) if not done.empty else None


def chest_pretraining(run_root: str | Path) -> Path:
    """The pretraining folder whose model.pt the chest-X-ray arm fine-tuned from (chapter 2 reads it), as the
    run root's matrix.json recorded it."""
    from .rundir import MATRIX, METRICS, read_json
    from .weights import Weights

    matrix_file = Path(run_root) / MATRIX
    arms = (read_json(matrix_file) if matrix_file.is_file() else {}).get("arms", {})
    weights = arms.get("run", {}).get("chest_xray", "")
    spec = Weights.parse(weights) if weights else None
    if spec is None or spec.scheme != "file" or not (spec.path.parent / METRICS).is_file():
        why = arms.get("not_run", {}).get("chest_xray", {}).get("reason", f"its init is {weights or 'unknown'}")
        raise CXRError(f"no cxrlib ChestX-ray14 pretraining behind the chest-X-ray arm in {run_root}: {why}")
    return spec.path.parent


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


class TableHTML(HTML):
    """IPython's HTML with a text/plain form: `print`, nbval and plain-text front ends see the table, not
    "<IPython.core.display.HTML object>"."""

    def __init__(self, data: str, text: str):
        super().__init__(data)
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _breakable(text: str, longest: int = 16) -> str:
    """`text` as HTML in which a token longer than `longest` characters may break after / _ - . or, failing
    those, every `longest` characters: a long file name wraps inside its cell; a short word never breaks."""
    def pieces(token: str) -> list[str]:
        return [p[i:i + longest] for p in re.split(r"(?<=[/_.\-])", token) for i in range(0, len(p), longest)]

    return "".join("<wbr>".join(map(html.escape, pieces(w))) if len(w) > longest and not w.isspace()
                   else html.escape(w) for w in re.split(r"(\s+)", text))


def _cell(value: Any, column: str) -> str:
    """One cell as the reader sees it: 3 decimals, '–' for missing, yes/no; a list of numbers is refused,
    because only the caller knows whether it is an interval (results.fmt_ci) or something else."""
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        items = list(value)
        if any(isinstance(v, numbers.Number) for v in items):
            raise TypeError(f"column {column!r} holds a list of numbers ({str(value)[:60]}): format it first, "
                            "e.g. results.fmt_ci(value, ci) for an interval")
        return ", ".join(_cell(v, column) for v in items) or "–"
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{value:.3f}".replace("-", "−") if math.isfinite(value) else "–"  # U+2212, as results.fmt_ci
    return str(value)


class Tables:
    """Numbered tables of one chapter: `tables = Tables(5)`, then `tables(frame, "caption")` shows
    "Table 5.1. caption" above the frame, every cell in full.

    Numbered here, not by Sphinx, because a notebook's HTML output is not a docutils table. Full text and
    fixed formats because pandas' own repr cuts long cells ("..."), prints floats to 6 digits, NaN and
    "Empty DataFrame", none of which reads on a page.
    """

    def __init__(self, chapter: int | str):
        self.chapter, self.count = chapter, 0

    def __call__(self, frame: pd.DataFrame | pd.Series, caption: str, index: bool = False,
                 empty: str = "Nothing to show.") -> TableHTML:
        """The table as HTML (with its own CSS) and plain text. `index=True` shows the index (each level of a
        MultiIndex) as leading columns; a frame without rows shows `empty` under the caption."""
        self.count += 1
        number = f"Table {self.chapter}.{self.count}."
        frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
        if index:
            names = [n if n is not None else ("" if frame.index.nlevels == 1 else f"level {i}")
                     for i, n in enumerate(frame.index.names)]
            frame = frame.rename_axis(names).reset_index()
        anchor = f"table-{self.chapter}-{self.count}"
        head = f'<span class="cxr-table-number">{number}</span> {_breakable(caption)}'
        if frame.empty:
            return TableHTML(f'<div class="cxr-table-wrap" id="{anchor}">{TABLE_CSS}<p class="cxr-caption">{head}'
                             f'</p><p class="cxr-table-empty">{html.escape(empty)}</p></div>',
                             f"{number} {caption}\n{empty}")
        columns = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
        shown = pd.DataFrame({i: [_cell(v, name) for v in frame.iloc[:, i]] for i, name in enumerate(columns)},
                             index=range(len(frame))).set_axis(columns, axis=1)  # by position: names may repeat
        numeric = [pd.api.types.is_numeric_dtype(d) and not pd.api.types.is_bool_dtype(d) for d in frame.dtypes]
        td = ['<td class="cxr-num">' if num else "<td>" for num in numeric]
        rows = "".join("<tr>" + "".join(f"{t}{_breakable(v)}</td>" for t, v in zip(td, row)) + "</tr>\n"
                       for row in shown.itertuples(index=False))
        header = "".join(f"<th>{_breakable(c)}</th>" for c in columns)
        return TableHTML(f'<div class="cxr-table-wrap">{TABLE_CSS}<table class="cxr-table" id="{anchor}">'
                         f"<caption>{head}</caption>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{rows}</tbody>"
                         f"</table></div>", f"{number} {caption}\n{shown.to_string(index=False)}")


def folded(title: str, *shown: TableHTML) -> TableHTML:
    """Tables inside a <details> element, closed: details a reader opens by their title (the verdict and its one
    table stay in view)."""
    return TableHTML(f"<details><summary><strong>{html.escape(title)}</strong></summary>"
                     f"{''.join(t.data for t in shown)}</details>", "\n\n".join([title, *(t.text for t in shown)]))


def launch_target(url: str, pagename: str) -> str:
    """`url` (a Binder/Colab/JupyterHub launch link of `pagename`) aimed at the paired notebook git tracks,
    notebooks/<chapter>.ipynb, instead of book/generated/<chapter>.ipynb, which is a build product (404)."""
    paired = f"{PAIRED}{Path(pagename).name}.ipynb"
    if not pagename.startswith(GENERATED) or not (ROOT / paired).is_file():
        return url
    return url.replace(f"{pagename}.ipynb", paired)


def _retarget_launch_buttons(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """html-page-context handler: rewrites the launch buttons sphinx-book-theme put into the context."""
    for group in context.get("header_buttons", []):
        if group.get("label") == "launch-buttons":
            for button in group.get("buttons", []):
                if "url" in button:
                    button["url"] = launch_target(button["url"], pagename)


def setup(app: Any) -> dict:
    """Sphinx extension (`_config.yml`: sphinx.extra_extensions): after sphinx-book-theme's own handler
    (priority 501) has made the launch buttons, point them at the tracked notebooks."""
    app.connect("html-page-context", _retarget_launch_buttons, priority=510)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
