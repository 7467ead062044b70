"""Browser check of the built book, page by page from _toc.yml, in headless Chromium at 1400 px.

A page fails on: a broken image, a table wider than the text column, text in an output (or a Sphinx
system message) matching `FORBIDDEN`, a notebook chapter without its "Data:" banner at the top, a
figure without a caption; and on what pandas' own repr leaves on a page (a table cell cut with "...", a
Series' `dtype:` line, a raw list of floats, NaN or an empty DataFrame), and a launch, download or
repository link to a path of this repository that git does not track. Each page also gets a full-page
screenshot (height measured from the DOM) in _build/screenshots/. The `book` tests run after `make
book`; the self-tests run the same check on hand-made pages with each defect, so the check itself can
fail.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pandas as pd
import pytest
import yaml

from cxrlib import book

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
WIDTH = 1400
FORBIDDEN = re.compile(r"Traceback|Warning:|\w*Error:|/tmp/|/root/")  # an error's output, not prose ("Errors per class")
TRUNCATED = re.compile(r"(\.\.\.|…)$")  # pandas cuts a long cell (and elides rows and columns) with "..."
SERIES_REPR = re.compile(r"\bdtype: ?\w+|^Name: .*\bdtype", re.M)  # a Series printed raw
BRACKETS = re.compile(r"\[([^\[\]]{1,4000})\]")
NUMBER = re.compile(r"[-−+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.I)
REPO = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/").split("github.com/")[-1]
# Where a launch (Binder, Colab, JupyterHub), download or repository link names a path of this repository.
REPO_LINKS = [re.compile(p) for p in (
    rf"/v2/gh/{REPO}/[^?#]+\?(?:[^#]*&)?urlpath=(?:lab/tree|tree|notebooks|doc/tree)/([^&#]+)",
    rf"colab\.research\.google\.com/github/{REPO}/blob/[^/]+/([^?#]+)",
    rf"github\.com/{REPO}/(?:blob|tree|edit|raw)/[^/]+/([^?#]+)",
    rf"raw\.githubusercontent\.com/{REPO}/[^/]+/([^?#]+)",
)]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000",
]
# Runs in the page once it has loaded (images decoded, layout done) and writes what it measured into
# the DOM, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const article = document.querySelector("article.bd-article") || document.querySelector("article") || document.body;
  const column = article.getBoundingClientRect().width;
  const name = (el) => (el.getAttribute("src") || el.innerText || "").trim().replace(/\\s+/g, " ").slice(0, 60);
  const h2 = article.querySelector("h2");
  const banners = [...article.querySelectorAll(".admonition:not(details)")].filter(
      (a) => !h2 || (a.compareDocumentPosition(h2) & Node.DOCUMENT_POSITION_FOLLOWING));
  const report = {
    height: Math.ceil(document.documentElement.scrollHeight),
    column: column,
    broken_images: [...document.images].filter((i) => !i.complete || i.naturalWidth === 0).map(name),
    wide_tables: [...article.querySelectorAll("table")]
        .map((t) => ({table: name(t), width: Math.ceil(t.getBoundingClientRect().width)}))
        .filter((t) => t.width > column + 1),
    output_text: [...article.querySelectorAll(".cell_output, .output, .system-message, .problematic")]
        .map((o) => o.innerText).join("\\n"),
    banners: banners.map((a) => a.innerText.trim().slice(0, 80)),
    uncaptioned: [...article.querySelectorAll("img")]
        .filter((i) => !i.closest("figure")?.querySelector("figcaption")?.innerText.trim()).map(name),
    n_tables: article.querySelectorAll("table").length,
    n_figures: article.querySelectorAll("figure").length,
    cells: [...article.querySelectorAll("td, th")].map((c) => c.innerText.trim()),
    empty_tables: [...article.querySelectorAll("table")].filter((t) => !t.querySelector("tbody tr")).map(name),
    links: [...new Set([...document.querySelectorAll("a[href]")].map((a) => a.href))].filter((h) => /^https?:/.test(h)),
  };
  // What a reader sees in the article, less the code cells' sources (last: it hides them for a moment).
  const inputs = [...article.querySelectorAll(".cell_input")];
  inputs.forEach((i) => { i.dataset.display = i.style.display; i.style.display = "none"; });
  report.page_text = article.innerText;
  inputs.forEach((i) => { i.style.display = i.dataset.display; });
  const pre = document.createElement("pre");
  pre.id = "cxr-report";
  pre.textContent = JSON.stringify(report);
  document.body.appendChild(pre);
});
</script>"""


def page_defects(report: dict, needs_banner: bool) -> list[str]:
    """What is wrong with one rendered page, from the probe's report (empty: nothing)."""
    defects = [f"broken image {src}" for src in report["broken_images"]]
    defects += [f"table {t['table']!r} is {t['width']} px wide, the text column {report['column']:.0f} px"
                for t in report["wide_tables"]]
    defects += [f"output shows {m.group(0)!r}: ...{report['output_text'][max(0, m.start() - 40):m.end() + 40]!r}"
                for m in FORBIDDEN.finditer(report["output_text"])]
    if needs_banner and not any(b.startswith("Data:") for b in report["banners"]):
        defects.append(f"no 'Data:' banner before the first section (admonitions there: {report['banners']})")
    defects += [f"figure without a caption: {src}" for src in report["uncaptioned"]]
    defects += [f"truncated table cell {c[-60:]!r}" for c in report["cells"] if TRUNCATED.search(c)]
    defects += [f"Series printed raw: {m.group(0)!r}" for m in SERIES_REPR.finditer(report["page_text"])]
    defects += [f"raw list of floats {m.group(0)[:60]!r}" for m in BRACKETS.finditer(report["page_text"])
                if raw_floats(m.group(1))]
    defects += [f"NaN in a table cell {c[:60]!r}" for c in report["cells"] if re.search(r"\bNaN\b", c)]
    defects += ["'Empty DataFrame' on the page"] * ("Empty DataFrame" in report["page_text"])
    defects += [f"empty table (no rows) {t!r}" for t in report["empty_tables"]]
    files = tracked_files()
    defects += [f"link to {path!r}, a path git does not track: {url}" for url in report["links"]
                for path in repo_paths(url) if files is not None and not is_tracked(path, files)]
    return defects


def raw_floats(inside: str) -> bool:
    """Brackets holding only numbers, one of them with 4 or more decimals: a list or array printed raw
    ("[0.1234567, 0.2345678]"), not a citation "[1]" or an interval the book formatted."""
    items = [i for i in re.split(r"[\s,]+", inside) if i]
    return bool(items) and all(NUMBER.fullmatch(i) for i in items) and any(re.search(r"\.\d{4}", i) for i in items)


def repo_paths(url: str) -> list[str]:
    """The paths of this repository that a link opens (Binder's urlpath, Colab's and GitHub's blob paths)."""
    url = unquote(url)
    return [m.group(1).strip("/") for p in REPO_LINKS for m in [p.search(url)] if m and m.group(1).strip("/")]


@functools.cache
def tracked_files() -> frozenset[str] | None:
    """`git ls-files` of the repository; None outside a git checkout (then links cannot be checked)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return frozenset(filter(None, out.split("\0")))


def is_tracked(path: str, files: frozenset[str]) -> bool:
    """A tracked file, or a folder holding one."""
    return path in files or any(f.startswith(path + "/") for f in files)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (`make check-book` installs Debian's chromium; it needs root)")
    return exe


# Headless Chromium now and then hangs on one load and never exits (CI saw a 14,548 px screenshot
# sit for 180 s that takes 5 s here). A hung try is killed with its whole process group and retried
# with a fresh profile; only a page that hangs every time fails.
TRIES, TRY_TIMEOUT = 3, 90


def _run(url: str, *extra: str, tmp: Path, height: int = 1000) -> str:
    for attempt in range(1, TRIES + 1):
        args = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / f'profile{attempt}'}",
                f"--window-size={WIDTH},{height}", *extra, url]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        try:
            return proc.communicate(timeout=TRY_TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    pytest.fail(f"chromium hung {TRIES} times ({TRY_TIMEOUT} s each) on {url} with {' '.join(extra)}")


def probe(page: Path, tmp: Path) -> dict:
    """Load a copy of `page` (same folder via <base>) with the probe script, return its report."""
    text = page.read_text(encoding="utf-8")
    base = f'<base href="{page.parent.as_uri()}/">'
    text = re.sub(r"<head[^>]*>", lambda m: m.group(0) + base, text, count=1)
    text = text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE
    copy = tmp / "probe.html"
    copy.write_text(text, encoding="utf-8")
    dom = _run(copy.as_uri(), "--dump-dom", tmp=tmp)
    found = re.search(r'<pre id="cxr-report"[^>]*>(.*?)</pre>', dom, re.S)
    assert found, f"{page}: the probe did not run (chromium printed {dom[-300:]!r})"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, height: int, shot: Path, tmp: Path) -> Path:
    """Full-page screenshot: the window is as tall as the page."""
    shot.parent.mkdir(parents=True, exist_ok=True)
    _run(page.as_uri(), f"--screenshot={shot}", tmp=tmp, height=max(height, 600))
    return shot


def toc_pages(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """Every file of the table of contents (root, chapters, parts, sections), in book order."""
    spec = yaml.safe_load(toc.read_text())

    def walk(entry: dict) -> list[str]:
        own = [entry[k] for k in ("root", "file") if k in entry]
        children = [c for key in ("chapters", "sections", "parts") for c in entry.get(key, [])]
        return own + [f for c in children for f in walk(c)]

    return walk(spec)


PAGES = toc_pages()


@pytest.mark.book
@pytest.mark.parametrize("page", PAGES)
def test_page(page, tmp_path):
    if not (HTML / "index.html").is_file():
        pytest.skip("the book is not built: run `make book` first")
    path = HTML / f"{page}.html"
    assert path.is_file(), f"{page} (in _toc.yml) is missing from the built book"
    report = probe(path, tmp_path)
    shot = screenshot(path, report["height"], SHOTS / f"{Path(page).name}.png", tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {page}"
    needs_banner = (ROOT / f"{page}.ipynb").is_file()  # every executed chapter says which data it ran on
    defects = page_defects(report, needs_banner)
    assert not defects, f"{page}:\n  " + "\n  ".join(defects)


# --- the check itself, on hand-made pages ------------------------------------------------------------

CLEAN = """<html><head><meta name="viewport" content="width=device-width"><style>{style}</style></head><body><article>
<h1>Chapter</h1>
{banner}
<h2>A section</h2>
<figure><img src="dot.png"><figcaption><p>Fig. 1: a dot.</p></figcaption></figure>
<div class="cell_output"><table><tr><th>a</th><td>1</td></tr></table><pre>all fine</pre></div>
<div class="cell_output">{table}</div>
<a href="https://mybinder.org/v2/gh/{repo}/main?urlpath=lab/tree/notebooks/01_data_analysis.ipynb">Binder</a>
<a href="https://colab.research.google.com/github/{repo}/blob/main/notebooks/01_data_analysis.ipynb">Colab</a>
<a href="https://github.com/{repo}">repository</a> <a href="_sources/book/generated/01_data_analysis.ipynb">.ipynb</a>
<a href="https://github.com/ieee8023/covid-chestxray-dataset/blob/master/metadata.csv">another repository</a>
<p>A citation [1], an interval [0.971, 0.990], a list of words [a, b].</p>
<div class="cell_output"><pre>Table 4.1. Errors per class on the 932 test images</pre></div>
{extra}
</article></body></html>"""
DEFECTS = {
    "broken image": '<figure><img src="missing.png"><figcaption>lost</figcaption></figure>',
    "px wide": '<table><tr><th>wide</th><td style="min-width: 1500px">x</td></tr></table>',
    "output shows 'Traceback'": '<div class="cell_output"><pre>Traceback (most recent call last)</pre></div>',
    "output shows '/tmp/'": '<div class="cell_output"><pre>saved to /tmp/run</pre></div>',
    "output shows 'Warning:'": '<div class="output stderr"><pre>UserWarning: careful</pre></div>',
    "output shows 'CXRError:'": '<div class="cell_output"><pre>CXRError: no runs in runs/quick</pre></div>',
    "figure without a caption": '<img src="dot.png">',
    "truncated table cell": '<table><tr><th>removed</th><td>ieee8023/A41A15BE-B322-89CC....</td></tr></table>',
    "Series printed raw": '<div class="cell_output"><pre>train  145\nval  29\nName: patients, dtype: int64</pre></div>',
    "raw list of floats": '<div class="cell_output"><pre>ci = [0.1234567, 0.2345678]</pre></div>',
    "NaN in a table cell": '<table><tr><th>auc</th><td>NaN</td></tr></table>',
    "'Empty DataFrame' on the page": '<div class="cell_output"><pre>Empty DataFrame\nColumns: [a]</pre></div>',
    "empty table (no rows)": '<table><thead><tr><th>a</th></tr></thead><tbody></tbody></table>',
    "link to 'book/generated/05_results.ipynb', a path git does not track":
        f'<a href="https://mybinder.org/v2/gh/{REPO}/main?urlpath=lab/tree/book/generated/05_results.ipynb">Binder</a>',
    "link to 'book/generated/01_data_analysis.ipynb', a path git does not track":
        f'<a href="https://colab.research.google.com/github/{REPO}/blob/main/book/generated/01_data_analysis.ipynb">'
        "Colab</a>",
}
LONG_CELLS = {"removed": ["ieee8023/A41A15BE-B322-89CC-E161-FC9F438E4496.jpeg " * 6],
              "kept (copy of)": ["coronahack/" + "person1234_bacteria_IM_0001" * 8 + ".jpeg"],
              "balanced accuracy (95% CI)": ["0.982 (0.971–0.990)"], "p": [0.0123456]}
WIDE_COLUMN = "body { margin: 0; } article { width: 800px; }"


@pytest.fixture
def hand_made(tmp_path):
    """A folder with a 4x4 PNG and a function writing a page into it."""
    from PIL import Image

    Image.new("L", (4, 4), 128).save(tmp_path / "dot.png")

    def write(extra: str = "", with_banner: bool = True, style: str = WIDE_COLUMN) -> Path:
        banner = book.banner("**Data: synthetic.** Hand-made page.").data if with_banner else ""
        table = book.Tables(1)(pd.DataFrame(LONG_CELLS), "Long cells, shown in full.").data
        page = tmp_path / "page.html"
        page.write_text(CLEAN.format(banner=banner, table=table, repo=REPO, extra=extra, style=style))
        return page

    return write


@pytest.mark.book
def test_check_passes_a_clean_page(hand_made, tmp_path):
    report = probe(hand_made(), tmp_path)
    assert page_defects(report, needs_banner=True) == []
    assert report["n_tables"] == 2 and report["n_figures"] == 1 and report["height"] > 0
    assert "0.012" in report["cells"] and "Table 1.1. Long cells, shown in full." in report["page_text"]


@pytest.mark.book
@pytest.mark.parametrize("column", [1384, 404])
def test_a_table_of_long_cells_fits_the_column(column, hand_made, tmp_path):
    """book.Tables wraps long file names inside their cells: the table fits a 1400 px screen's column and a
    420 px phone's (a column that narrow, since headless Chromium's window is at least 500 px wide)."""
    report = probe(hand_made(style=f"body {{ margin: 0 8px; }} article {{ width: {column}px; }}"), tmp_path)
    assert report["column"] == column and not report["wide_tables"], report["wide_tables"]
    assert page_defects(report, needs_banner=True) == []


@pytest.mark.book
@pytest.mark.parametrize("expected", DEFECTS)
def test_check_finds_each_defect(expected, hand_made, tmp_path):
    if "git does not track" in expected and tracked_files() is None:
        pytest.skip("not a git checkout: links into the repository cannot be checked")
    defects = page_defects(probe(hand_made(DEFECTS[expected]), tmp_path), needs_banner=True)
    assert len(defects) == 1 and expected in defects[0], defects


@pytest.mark.book
def test_check_finds_a_missing_banner(hand_made, tmp_path):
    report = probe(hand_made(with_banner=False), tmp_path)
    assert page_defects(report, needs_banner=False) == []
    assert "no 'Data:' banner" in page_defects(report, needs_banner=True)[0]


@pytest.mark.book
def test_screenshot_is_full_page(hand_made, tmp_path):
    from PIL import Image

    page = hand_made('<div style="height: 3000px">tall</div>')
    report = probe(page, tmp_path)
    assert report["height"] >= 3000
    with Image.open(screenshot(page, report["height"], tmp_path / "shot.png", tmp_path)) as shot:
        assert shot.size == (WIDTH, report["height"])


def test_a_hung_browser_is_killed_and_retried(tmp_path, monkeypatch):
    """A stand-in browser that hangs on its first launch (with a child holding the pipe) and then prints."""
    fake = tmp_path / "browser"
    fake.write_text(f"#!/bin/sh\nif [ ! -e {tmp_path}/once ]; then touch {tmp_path}/once; sleep 60 & sleep 60; fi\n"
                    "echo rendered\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys.modules[__name__], "chromium", lambda: str(fake))
    monkeypatch.setattr(sys.modules[__name__], "TRY_TIMEOUT", 1)
    assert _run("file:///page.html", tmp=tmp_path).strip() == "rendered"
    (tmp_path / "once").unlink()
    monkeypatch.setattr(sys.modules[__name__], "TRIES", 1)  # a browser that hangs on every try fails the page
    with pytest.raises(pytest.fail.Exception, match="hung 1 times"):
        _run("file:///page.html", tmp=tmp_path)


def test_toc_pages_follow_the_toc(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text("format: jb-book\nroot: intro\nparts:\n  - caption: A\n    chapters:\n      - file: a\n"
                   "        sections:\n          - file: a1\n  - caption: B\n    chapters:\n      - file: b\n")
    assert toc_pages(toc) == ["intro", "a", "a1", "b"]
    assert PAGES[0] == "book/intro" and len(PAGES) == len(set(PAGES))


# --- the notebook helpers the book relies on -----------------------------------------------------------

def test_banner_is_an_admonition_starting_with_data():
    shown = book.banner("**Data: synthetic.** No data was configured; set `coronahack_dir`.").data
    assert shown.startswith('<div class="admonition note">')
    assert '<p class="admonition-title">Data: synthetic.</p>' in shown and "<code>coronahack_dir</code>" in shown
    assert "admonition-title\">Data: CoronaHack." in book.banner("Data: CoronaHack. Research use only.").data


def test_tidy_notebook_hides_parameters_and_drops_widgets(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells = [nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("a = 2", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("train()"), nbformat.v4.new_markdown_cell("text")]
    nb.cells[2].outputs = [
        nbformat.v4.new_output("display_data", {book.WIDGET_MIME: {"model_id": "x"}, "text/plain": "HBox(...)"}),
        nbformat.v4.new_output("stream", name="stdout", text="epoch 1/1: train loss 0.5\n")]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    for _ in range(2):  # idempotent
        book.tidy_notebook(path)
        tidy = nbformat.read(path, as_version=4)
        assert [c.metadata.get("tags", []).count("remove-cell") for c in tidy.cells] == [1, 1, 0, 0]
        assert [o.output_type for o in tidy.cells[2].outputs] == ["stream"]
        assert "widgets" not in tidy.metadata


def test_launch_buttons_open_the_tracked_notebook():
    """sphinx-book-theme aims Binder and Colab at the page's source, book/generated/<chapter>.ipynb, which the
    build makes and git ignores (404 on GitHub); cxrlib.book's extension aims them at notebooks/<chapter>.ipynb."""
    page, paired = "book/generated/05_results", "notebooks/05_results.ipynb"
    binder = f"https://mybinder.org/v2/gh/{REPO}/main?urlpath=lab/tree/{page}.ipynb"
    colab = f"https://colab.research.google.com/github/{REPO}/blob/main/{page}.ipynb"
    download = {"url": f"../../_sources/{page}.ipynb"}
    context = {"header_buttons": [
        {"label": "launch-buttons", "buttons": [{"url": binder}, {"url": colab}, {"type": "javascript"}]},
        {"label": "download-buttons", "buttons": [download]}]}
    book._retarget_launch_buttons(None, page, "page.html", context, None)
    urls = [b.get("url") for b in context["header_buttons"][0]["buttons"]]
    assert urls == [binder.replace(f"{page}.ipynb", paired), colab.replace(f"{page}.ipynb", paired), None]
    assert [p for u in urls[:2] for p in repo_paths(u)] == [paired, paired]
    assert tracked_files() is None or is_tracked(paired, tracked_files())
    assert download == {"url": f"../../_sources/{page}.ipynb"}  # the built site's own copy: fine as it is
    assert book.launch_target(binder, "book/intro") == binder  # not a generated chapter
    absent = binder.replace("05_results", "99_absent")  # no paired notebook: left alone (the browser check says so)
    assert book.launch_target(absent, "book/generated/99_absent") == absent


def test_the_book_loads_the_launch_extension_after_the_theme():
    import inspect

    import sphinx_book_theme

    assert "cxrlib.book" in yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["extra_extensions"]
    calls = []

    class App:
        def connect(self, event, handler, priority=500):
            calls.append((event, handler, priority))

    assert book.setup(App())["parallel_read_safe"]
    theirs = int(re.search(r"add_launch_buttons, priority=(\d+)", inspect.getsource(sphinx_book_theme.setup))[1])
    assert [(event, handler) for event, handler, _ in calls] == [("html-page-context", book._retarget_launch_buttons)]
    assert calls[0][2] > theirs  # Sphinx runs handlers by ascending priority: ours sees the theme's buttons
