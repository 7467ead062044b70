"""Issue 19's remedy arms on small data: lungs only (and its control, whose marker outside the lungs must vanish),
adults only, and the held-out populations that no arm trains or validates on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrlib import audit, data, images, metrics, preprocess, synthetic
from cxrlib.config import CHOICES, RunConfig
from cxrlib.errors import CXRError
from cxrlib.runs import parse_variants

SIZE = 64
UNSEEN = "country=italy;collection=ieee8023&covid=no"  # the remedy runs' hold-out (Makefile REMEDY_HOLD_OUT)


@pytest.fixture(scope="module")
def adults(tmp_path_factory):
    """Synthetic ieee8023 images (all adults), plain and lungs-only, and their table."""
    base = tmp_path_factory.mktemp("remedy")
    table, _ = data.read_ieee8023(synthetic.make_ieee8023(base / "ieee", n=110))
    plain = images.ImageCache(SIZE, root=base / "cache").load(table["path"].tolist())[0]
    only = preprocess.PreprocessedCache(SIZE, "lungs_only", root=base / "cache").load(table["path"].tolist())[0]
    return table, plain, only


def test_lungs_only_keeps_the_lungs_and_paints_the_rest(adults):
    _, plain, only = adults
    template = synthetic.lung_mask(SIZE)
    assert (only[:, :6, :6] == 128).all() and (only[:, -6:, -6:] == 128).all()  # corners painted
    inner = np.zeros_like(template)
    inner[SIZE // 4:3 * SIZE // 4] = template[SIZE // 4:3 * SIZE // 4]
    kept = np.abs(only[:, inner].astype(int) - plain[:, inner].astype(int)) <= 8  # resizing blurs the edge
    assert kept.mean() > 0.95
    removed = preprocess.lungs_removed(plain[0])
    assert ((preprocess.lungs_only(plain[0]) == 128) | (removed == 128)).all()  # the mirror: between them, all is grey


def _probe(table: pd.DataFrame, pixels: np.ndarray, covid: np.ndarray) -> float:
    small = np.stack([images.resize_square(p, 16) for p in pixels]).reshape(len(pixels), -1)
    return audit.probe(small, pd.Series(covid), table["patient_id"], seed=0)["balanced_accuracy"]


def test_the_lungs_only_control_marker_is_painted_away(adults, tmp_path):
    table, plain, _ = adults
    rng = np.random.default_rng(1)
    patients = table["patient_id"].unique()
    covid = table["patient_id"].isin(rng.choice(patients, len(patients) // 2, replace=False)).to_numpy()
    after = preprocess.plant_marker(plain, covid)  # a marker the model can see (the lungs-removed control's order)
    before = preprocess.MarkerCache(SIZE, root=tmp_path).mark(plain, covid)  # the lungs-only control: planted, then painted
    assert _probe(table, after, covid) > 0.9  # the marker alone tells the labels apart ...
    assert _probe(table, before, covid) < 0.7  # ... and once the outside is painted it no longer does
    marker = preprocess.plant_marker(np.zeros_like(plain[:1]), [True])[0] == 250
    assert (before[:, marker] == 128).all()  # not a pixel of it is left
    unmarked = np.stack([preprocess.lungs_only(p) for p in plain])
    assert (before == unmarked).all(axis=(1, 2)).mean() > 0.95  # almost every image is exactly the unmarked one


def test_the_control_reads_plain_images_and_marks_before_painting(tmp_path):
    cache = preprocess.make_cache(SIZE, "lungs_only_marker")
    assert cache.marker == "before" and isinstance(cache, preprocess.MarkerCache)
    assert cache.dir == images.ImageCache(SIZE).dir  # the plain images: marked, then painted, as a dataset loads them
    assert preprocess.make_cache(SIZE, "lungs_only").marker == ""
    assert preprocess.make_cache(SIZE, "lungs_removed_marker").marker == "after"
    assert preprocess.preprocess_store("lungs_only") != preprocess.preprocess_store("lungs_only_clahe")


def test_hold_out_takes_several_terms_and_names_one_that_matches_nothing():
    table = pd.DataFrame({"patient_id": ["ieee8023:1", "ieee8023:2", "ieee8023:3", "kermany:4", "nih:5"],
                          "label": ["covid", "pneumonia", "covid", "pneumonia", "normal"],
                          "location": ["Rome, Italy", "Toronto, Canada", "Madrid, Spain", "", ""]})
    assert data.held_out(table, UNSEEN).tolist() == [True, True, False, False, False]
    assert data.held_out(table, "collection=nih").tolist() == [False] * 4 + [True]
    with pytest.raises(CXRError, match="no image has collection 'ieee8023' and covid 'maybe'"):
        data.held_out(table, "country=italy;collection=ieee8023&covid=maybe")
    with pytest.raises(CXRError, match="unknown column 'ward'"):
        data.held_out(table, "ward=3")
    with pytest.raises(CXRError, match="is not COLUMN=VALUE"):
        RunConfig(hold_out="country=italy;&")


def test_adults_cohort_drops_children_and_needs_adult_negatives():
    table = pd.DataFrame({"patient_id": ["kermany:1", "ieee8023:2", "ieee8023:3", "nih:4", "nih:5", "kermany:6"],
                          "age": [np.nan, np.nan, 70.0, 12.0, 40.0, 30.0]})
    assert data.in_cohort(table, "adults").tolist() == [False, True, True, False, True, True]
    assert data.in_cohort(table, "all").all()
    with pytest.raises(CXRError, match="cohort=adults.*extra_negatives"):
        RunConfig(cohort="adults")
    assert RunConfig(cohort="adults", extra_negatives="/n").run_name() == "multiclass-ce-resnet50-none-adults-s0"
    assert CHOICES["cohort"] == ("all", "adults")


def test_the_remedy_arms_are_variants_of_the_run_matrix():
    assert parse_variants("lungs_only,lungs_only_marker,adults,adults+lungs_only,adults+lungs_only_clahe", "/n") == [
        {"preprocess": "lungs_only"}, {"preprocess": "lungs_only_marker"},
        {"extra_negatives": "/n", "cohort": "adults"},
        {"extra_negatives": "/n", "cohort": "adults", "preprocess": "lungs_only"},
        {"extra_negatives": "/n", "cohort": "adults", "preprocess": "lungs_only_clahe"}]
    with pytest.raises(CXRError, match="'adults' needs --extra-negatives"):
        parse_variants("adults")


def test_held_out_populations_are_never_in_train_or_val(real_data):
    """On the real data: the unseen populations of every remedy arm are test-only, before and after the cohort."""
    coronahack, ieee, nih = (real_data / d for d in ("coronahack", "covid-chestxray-dataset", "nih-chestxray14-subset"))
    if not all(d.is_dir() for d in (coronahack, ieee, nih)):
        pytest.skip(f"the three real collections are not all in {real_data}")
    table, _ = data.load_table(str(coronahack), str(ieee), extra_negatives=str(nih))
    split = data.split_table(table, "binary", seed=0, hold_out=UNSEEN)
    unseen = data.held_out(split, UNSEEN)
    ieee_negatives = split["patient_id"].str.startswith("ieee8023:") & split["label"].ne("covid")
    assert 60 <= ieee_negatives.sum() <= 90 and split.loc[ieee_negatives, "patient_id"].nunique() >= 30
    assert (split.loc[unseen | ieee_negatives, "split"] == "test").all()
    adults = split[data.in_cohort(split, "adults")]
    assert not adults["patient_id"].str.startswith("kermany:").any()
    assert (adults.loc[adults["source"] == "nih", "age"] >= 18).all()
    assert set(adults.loc[adults["split"] != "test", "label"]) == {"covid", "normal", "pneumonia"}


def _remedy_runs(root):
    """Four hand-written run folders, seed 0: the paper set-up calls every unseen adult COVID-19; lungs only and
    its control call them right; adults only trained on NIH, so NIH is no evidence for it."""
    from test_generalise import fake_run, nih_rows, own_split, write_nih_meta

    ieee_negatives = [(f"ieee8023/n{i}.jpg", f"ieee8023:n{i}", "ieee8023", "non_covid") for i in range(30)]
    italy = [(f"ieee8023/it{i}.jpg", f"ieee8023:it{i}", "ieee8023", "covid", 0.9) for i in range(30)]
    held = tuple(r[0] for r in ieee_negatives + italy)
    ages = {f"a{i:02d}.png": 30.0 + i for i in range(30)}
    nih = write_nih_meta(root / "nih", ages)
    common = dict(hold_out=UNSEEN, seed=0, loss="ce")

    def run(name, p_negative, **config):
        test = own_split() + [(*r, p_negative) for r in ieee_negatives] + italy
        trained = ("coronahack", "ieee8023", "nih") if config.get("cohort") == "adults" else ("coronahack", "ieee8023")
        return fake_run(root / "runs", name, test, external={"nih": (str(nih), nih_rows(ages, [p_negative] * 30))},
                        trained=trained, held_out=held, **common, **config)

    run("paper", 0.9)
    run("lungs", 0.1, preprocess="lungs_only")
    run("control", 0.1, preprocess="lungs_only_marker")
    run("adults", 0.1, cohort="adults", extra_negatives=str(nih))
    run("unrelated", 0.1, preprocess="clahe")  # an arm of another chapter: left out
    ieee_ages = pd.Series(60.0, index=[r[0] for r in ieee_negatives])
    return ieee_ages, nih


def test_remedy_arms_are_judged_on_unseen_populations_and_paired_with_the_paper_set_up(tmp_path):
    from cxrlib import generalise, remedies

    ieee_ages, nih = _remedy_runs(tmp_path)
    arms = remedies.load_arms(tmp_path / "runs")
    assert arms["label"].tolist() == ["paper set-up", "lungs only", "adults only", remedies.CONTROL_NAME]
    ages = pd.concat([ieee_ages, generalise.read_ages(arms)[0]])
    goals = remedies.goal_rows(arms, ages, n_boot=200)
    verdicts = goals.set_index(["label", "population"])["verdict"].to_dict()
    italy = "COVID-19 images of the held-out source (country=italy)"
    ieee, nih_adults = "ieee8023 adults without COVID-19 (test split)", "NIH ChestX-ray14 adults without COVID-19"
    assert verdicts[("paper set-up", ieee)] == "not met" and verdicts[("paper set-up", nih_adults)] == "not met"
    assert verdicts[("lungs only", ieee)] == "met" and verdicts[("lungs only", italy)] == "undecided"  # 0.9 of 30
    assert ("adults only", nih_adults) not in verdicts  # it trained on NIH images: no evidence there
    assert remedies.CONTROL_NAME not in set(goals["label"])  # the control is no remedy
    aucs = remedies.auc_rows(arms, ages, n_boot=200)
    text = remedies.paragraphs(arms, goals, aucs, n_boot=200)
    assert text[0].startswith("**paper set-up** (1 run, seed 0): threshold-free **not met**: ROC AUC 0.500")
    assert "operating point (secondary; thresholds seed 0: 0.500): goal **not met**" in text[0]
    lungs = next(t for t in text if t.startswith("**lungs only**"))
    assert "on the 24 test images both scored" in lungs  # the held-out 60 are not internal
    assert "ROC AUC +0.000" in lungs and "against 0.000" in lungs
    adults = next(t for t in text if t.startswith("**adults only**"))
    assert "COVID-19 sensitivity +0.000" in adults
    assert "the marker left no trace" in text[-1]
    assert "every patient with an image of country=italy, or of collection=ieee8023 without COVID-19" in \
        remedies.settings(arms)
    line = remedies.findings_line(remedies.record(arms, goals, aucs))  # the book's first page
    assert line.index("**Threshold-free, on people no run saw.**") < line.index("operating point (secondary)")
    assert "paper set-up (1 run, seed 0): not met; lungs only (1 run, seed 0): undecided" in line


def test_each_arm_is_judged_threshold_free_only_once_it_has_learned(tmp_path):
    """Issue 32: the unseen-population ROC AUC (held-out COVID-19 against held-out adults without it) decides, and
    an arm whose own-test AUC is below the floor is said to have learned only weakly and is not judged."""
    from test_generalise import fake_run, own_split

    from cxrlib import generalise, remedies

    negatives = [(f"ieee8023/n{i}.jpg", f"ieee8023:n{i}", "ieee8023", "non_covid", 0.1) for i in range(30)]
    child = [("ieee8023/child.jpg", "ieee8023:child", "ieee8023", "non_covid", 0.99)]  # not an adult: left out
    italy = [(f"ieee8023/it{i}.jpg", f"ieee8023:it{i}", "ieee8023", "covid", 0.9) for i in range(30)]
    held = tuple(r[0] for r in negatives + child + italy)
    ages = pd.Series({**{r[0]: 60.0 for r in negatives}, "ieee8023/child.jpg": 8.0})
    common = dict(hold_out=UNSEEN, loss="ce", held_out=held)
    for seed in (0, 1):
        fake_run(tmp_path, f"lungs-s{seed}", own_split() + negatives + child + italy, seed=seed,
                 preprocess="lungs_only", **common)
        fake_run(tmp_path, f"adults-s{seed}", own_split(called=0.1) + negatives + child + italy, seed=seed,
                 cohort="adults", extra_negatives="nih", threshold=0.2, **common)
    metrics_file = tmp_path / "adults-s1" / "metrics.json"  # a run whose threshold the bound decided
    metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()),
                                        "threshold_selection": metrics.bounded_threshold(0.0005)}))
    arms = remedies.load_arms(tmp_path)
    assert remedies.threshold_rule(arms).endswith("The bound decided the threshold of adults only (binary, "
                                                  "cross-entropy loss, random init, seed 1) (flagged in the first table).")
    assert generalise.bound_note(arms).startswith("**Threshold at the bound.** The validation rule of adults only "
                                                  "(binary, cross-entropy loss, random init, seed 1) reached for")
    assert generalise.bound_note(arms[arms["label"] == "lungs only"]) == ""
    rows = remedies.auc_rows(arms, ages, n_boot=200).set_index("label")
    lungs, adults = rows.loc["lungs only"], rows.loc["adults only"]
    assert lungs["unseen"]["value"] == 1.0 and lungs["unseen"]["n_negative"] == 30  # the child is no adult
    assert lungs["own"]["value"] == 1.0 and lungs["learned"] and lungs["verdict"] == "met"
    assert adults["unseen"]["value"] == 1.0 and adults["own"]["value"] == 0.5  # ranks the unseen, not its own
    assert not adults["learned"] and adults["verdict"] == remedies.WEAK
    shown = remedies.auc_table(rows.reset_index()).set_index("arm")
    assert shown.loc["adults only (2 runs, seeds 0, 1)", "ROC AUC, unseen (95% CI)"].endswith(", apart: not judged")
    assert shown.loc["lungs only (2 runs, seeds 0, 1)", "ROC AUC, unseen (95% CI)"].startswith("1.000")
    assert shown.loc["adults only (2 runs, seeds 0, 1)", "verdict"].startswith(
        "learned the task only weakly here (AUC 0.500")
    assert shown.loc["adults only (2 runs, seeds 0, 1)", "threshold per run"] == \
        "seed 0: 0.200; seed 1: 0.010, at the bound (unbounded 0.0005)"
    said = remedies.auc_paragraph(rows.reset_index())
    assert "Not judged: adults only learned the task only weakly here" in said and "lungs only met" in said


def test_source_and_label_says_when_debiasing_by_source_cannot_work():
    from cxrlib import remedies

    table = pd.DataFrame({"patient_id": ["ieee8023:1", "ieee8023:2", "kermany:3", "ieee8023:4"],
                          "label": ["covid", "pneumonia", "normal", "covid"], "location": ["", "", "", "Italy"]})
    assert "coincide" in remedies.source_and_label(table, UNSEEN)
    assert "could be tried" in remedies.source_and_label(table, "country=italy")


def test_held_out_negatives_never_reach_train_or_val_on_the_synthetic_default():
    """The small-data twin of the real-data test: every ieee8023 image without COVID-19 is test-only, also
    after the adults cohort drops the children."""
    table, _ = data.load_table()
    spec = "collection=ieee8023&covid=no"
    split = data.split_table(table, "binary", seed=0, hold_out=spec)
    negatives = split["patient_id"].str.startswith("ieee8023:") & split["label"].ne("covid")
    assert negatives.sum() >= 5 and (split.loc[negatives, "split"] == "test").all()
    adults = split[data.in_cohort(split, "adults")]
    assert not adults["patient_id"].str.startswith("kermany:").any()
    assert (adults.loc[adults["patient_id"].str.startswith("ieee8023:") & adults["label"].ne("covid"), "split"]
            == "test").all()
