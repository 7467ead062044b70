"""book.Tables: numbered tables whose every cell reads (full text, 3 decimals, '–', yes/no), one rule per test."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest

from cxrlib import book
from cxrlib.results import fmt_ci


def cells(shown: book.TableHTML) -> list[str]:
    """The cells' text as a browser shows it (<wbr> only marks where a long token may break)."""
    return [html.unescape(c.replace("<wbr>", "")) for c in re.findall(r"<td[^>]*>(.*?)</td>", shown.data, re.S)]


def test_tables_are_numbered_per_chapter_in_call_order():
    tables = book.Tables(5)
    first, second = (tables(pd.DataFrame({"a": [1]}), f"caption {i}") for i in (1, 2))
    assert "<caption><span class=\"cxr-table-number\">Table 5.1.</span> caption 1</caption>" in first.data
    assert "Table 5.2.</span> caption 2" in second.data and 'id="table-5-2"' in second.data
    assert book.Tables(6)(pd.DataFrame({"a": [1]}), "x").text.startswith("Table 6.1. x\n")


def test_a_long_cell_is_shown_in_full_and_wraps():
    long = "ieee8023/" + "A41A15BE-B322-89CC-E161-FC9F438E4496 " * 8  # 305 characters
    with pd.option_context("display.max_colwidth", 20):
        shown = book.Tables(1)(pd.DataFrame({"file": [long.strip()]}), "long")
    assert cells(shown) == [long.strip()] and long.strip() in shown.text
    assert "..." not in shown.data + shown.text and "…" not in shown.data + shown.text
    assert "ieee8023/<wbr>A41A15BE-<wbr>B322-<wbr>" in shown.data  # breaks after / and -, not inside words
    assert "overflow-wrap: break-word" in shown.data and "overflow-x: auto" in shown.data  # scoped, inline CSS
    assert shown.data.count("<style>") == 1 and ".cxr-table " in shown.data


def test_floats_have_3_decimals_missing_is_a_dash_booleans_are_words():
    frame = pd.DataFrame({"auc": [0.98765, -0.5, np.nan], "n": [3, 4, 5], "ok": [True, False, None],
                          "note": ["a", None, "c"]})
    shown = book.Tables(1)(frame, "formats")
    assert cells(shown) == ["0.988", "3", "yes", "a", "−0.500", "4", "no", "–", "–", "5", "–", "c"]
    assert "NaN" not in shown.data + shown.text and "None" not in shown.data + shown.text
    assert '<td class="cxr-num">0.988</td>' in shown.data  # numbers align right


def test_a_raw_list_of_numbers_is_refused_naming_its_column():
    frame = pd.DataFrame({"arm": ["a"], "auc (95% CI)": [(0.971, 0.990)]})
    with pytest.raises(TypeError, match=r"'auc \(95% CI\)'.*fmt_ci"):
        book.Tables(1)(frame, "raw interval")
    with pytest.raises(TypeError, match="'x'"):
        book.Tables(1)(pd.DataFrame({"x": [np.array([0.1234567, 0.2345678])]}), "array")
    formatted = frame.assign(**{"auc (95% CI)": [fmt_ci(0.982, (0.971, 0.990))]})
    assert cells(book.Tables(1)(formatted, "formatted"))[1] == "0.982 (0.971–0.990)"
    assert cells(book.Tables(1)(pd.DataFrame({"tags": [["a", "b"]]}), "words")) == ["a, b"]


def test_an_empty_frame_shows_the_caption_and_the_sentence():
    shown = book.Tables(2)(pd.DataFrame(columns=["a", "b"]), "runs", empty="No run measured this.")
    assert "Table 2.1.</span> runs" in shown.data and "No run measured this." in shown.data
    assert "<table" not in shown.data and "Empty DataFrame" not in shown.data + shown.text
    assert shown.text == "Table 2.1. runs\nNo run measured this."


def test_index_is_hidden_unless_asked_and_a_multiindex_becomes_columns():
    frame = pd.DataFrame({"images": [24, 93]},
                         index=pd.MultiIndex.from_tuples([("coronahack", "covid"), ("ieee8023", "covid")],
                                                         names=["source", "label"]))
    assert cells(book.Tables(1)(frame, "hidden")) == ["24", "93"]
    shown = book.Tables(1)(frame, "shown", index=True)
    assert re.findall(r"<th>(.*?)</th>", shown.data) == ["source", "label", "images"]
    assert cells(shown) == ["coronahack", "covid", "24", "ieee8023", "covid", "93"]
    series = book.Tables(1)(pd.Series({"train": 145, "val": 29}, name="patients"), "patients", index=True)
    assert cells(series) == ["train", "145", "val", "29"] and "dtype" not in series.text + series.data


def test_plain_text_form_is_what_print_and_nbval_see():
    from IPython.core.formatters import PlainTextFormatter
    from IPython.display import HTML

    shown = book.Tables(1)(pd.DataFrame({"split": ["train"], "images": [266]}), "counts")
    assert isinstance(shown, HTML) and shown._repr_html_() == shown.data
    assert PlainTextFormatter()(shown) == repr(shown) == str(shown) == shown.text
    assert shown.text.splitlines()[0] == "Table 1.1. counts" and "train" in shown.text and "266" in shown.text
    assert "IPython.core.display" not in shown.text


def test_only_long_tokens_may_break():
    shown = book.Tables(1)(pd.DataFrame({"label": ["pneumonia"], "file": ["a" * 40], "note": ["x < y & z"]}), "t")
    assert "<td>pneumonia</td>" in shown.data and "<td>x &lt; y &amp; z</td>" in shown.data
    assert f"<td>{'a' * 16}<wbr>{'a' * 16}<wbr>{'a' * 8}</td>" in shown.data



def test_folded_tables_sit_in_a_closed_details_element_under_their_title():
    tables = book.Tables(6)
    shown = book.folded("Every run <&>", tables(pd.DataFrame({"a": [1]}), "one"))
    assert shown.data.startswith("<details><summary><strong>Every run &lt;&amp;&gt;</strong></summary>")
    assert "Table 6.1." in shown.data and shown.text.startswith("Every run <&>\n\nTable 6.1. one")
