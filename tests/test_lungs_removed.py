"""The train-on-lungs-removed experiment: the preprocessing removes the lung signal and keeps what lies outside,
the control's marker is planted by label in every split, and the table/verdicts are read from run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib import audit, bundle, data, images, lungs_removed, preprocess, synthetic
from cxrlib.config import RunConfig
from cxrlib.metrics import compute_metrics, majority_baseline

SIZE = 64


@pytest.fixture(scope="module")
def adults(tmp_path_factory):
    """Synthetic ieee8023 folders (all adults, so nothing outside the lungs tells COVID from the other
    pneumonias) without and with the planted corner block: {shortcut: (table, intact, lungs removed)}."""
    base = tmp_path_factory.mktemp("adults")
    out = {}
    for shortcut in (False, True):
        table, _ = data.read_ieee8023(synthetic.make_ieee8023(base / str(shortcut), n=110, shortcut=shortcut))
        intact = images.ImageCache(SIZE, root=base / "cache").load(table["path"].tolist())[0]
        removed = preprocess.PreprocessedCache(SIZE, "lungs_removed", root=base / "cache").load(table["path"].tolist())[0]
        out[shortcut] = (table, intact, removed)
    return out


def _pixel_probe(table: pd.DataFrame, pixels: np.ndarray) -> dict:
    """Can a logistic regression on 16x16 thumbnails tell COVID from the rest (patient-grouped CV)?"""
    small = np.stack([images.resize_square(p, 16) for p in pixels]).reshape(len(pixels), -1)
    return audit.probe(small, table["label"].eq("covid"), table["patient_id"], seed=0)


def test_lungs_removed_keeps_the_outside_and_removes_the_lung_signal(adults):
    table, intact, removed = adults[False]
    template = synthetic.lung_mask(SIZE)
    assert (np.abs(removed[:, template].astype(int) - 128) <= 8).mean() > 0.97  # the lung fields are grey (edges blur) ...
    assert np.array_equal(removed[:, :4, :4], intact[:, :4, :4])  # ... the corners untouched
    with_lungs, without = (_pixel_probe(table, px)["balanced_accuracy"] for px in (intact, removed))
    assert with_lungs > 0.8  # the COVID haze is in the lungs ...
    assert without < 0.75 and without < with_lungs - 0.15  # ... and mostly gone with them (the masks are estimates)
    table, _, removed = adults[True]
    assert _pixel_probe(table, removed)["balanced_accuracy"] > 0.9  # a marker outside the lungs survives


def test_the_control_marker_is_planted_by_label_in_every_split(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(["covid", "normal", "pneumonia", "covid"]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(synthetic.chest_image(rng, label, synthetic._patient(rng, label, adult=True))).save(path)
        rows.append({"path": str(path), "label": label})
    table = pd.DataFrame(rows)
    plain = images.CXRDataset(table, "binary", preprocess.make_cache(SIZE, "lungs_removed"))
    marked = images.CXRDataset(table, "binary", preprocess.make_cache(SIZE, "lungs_removed_marker"))
    assert preprocess.make_cache(SIZE, "lungs_removed").dir == preprocess.make_cache(SIZE, "lungs_removed_marker").dir
    changed = (plain.images != marked.images).any(axis=(1, 2))
    assert changed.tolist() == [True, False, False, True]
    assert not (marked.images[:, synthetic.lung_mask(SIZE)] == 250).any()  # the marker is outside the lungs
    # prediction has no label: the control's preprocessing there is the plain one
    assert np.array_equal(preprocess.load_preprocessed(rows[0]["path"], SIZE, "lungs_removed_marker"), plain.images[0])


def test_the_arms_are_variants_of_the_run_matrix():
    from cxrlib.runs import parse_variants

    assert parse_variants("lungs_removed,lungs_removed_marker") == [
        {"preprocess": "lungs_removed"}, {"preprocess": "lungs_removed_marker"}]
    assert RunConfig(preprocess="lungs_removed_marker").run_name().endswith("-lungs_removed_marker-s0")


def _table(root):
    return lungs_removed.arm_table(lungs_removed.find_arms(root))


def _fake_run(root: Path, preprocess: str, p_covid: np.ndarray, y: np.ndarray, epochs: int = 3,
              status: str = "complete") -> Path:
    """A run folder as training writes it (params.json, status, metrics.json) with test scores `p_covid`."""
    cfg = RunConfig(task="binary", preprocess=preprocess, epochs=epochs, image_size=32)
    run = root / "data-tag" / cfg.run_name().replace("-s0", f"-e{epochs}-s0")
    run.mkdir(parents=True)
    classes = ["non_covid", "covid"]
    pred = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(y))], "patient_id": [f"p{i // 2}" for i in range(len(y))],
                         "source": "coronahack", "true": np.array(classes)[y],
                         "pred": np.array(classes)[(p_covid >= 0.5).astype(int)], "p_non_covid": 1 - p_covid,
                         "p_covid": p_covid})
    m = compute_metrics(pred, classes, n_boot=200)
    m["majority_baseline"] = majority_baseline(y, y, classes)
    (run / "metrics.json").write_text(json.dumps(m))
    pred.to_csv(run / "predictions.csv", index=False)
    (run / "params.json").write_text(json.dumps({"config": cfg.to_dict(), "data": {"record": {"fingerprint": "abc"}}}))
    (run / "status").write_text(status)
    return run


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    return y, {"perfect": np.where(y == 1, 0.9, 0.1) + rng.uniform(-0.05, 0.05, len(y)),
               "good": y * 0.3 + rng.uniform(0, 0.6, len(y)),  # overlapping: AUC about 0.9
               "chance": rng.uniform(0, 1, len(y))}


def test_table_and_verdicts_when_the_model_learned_outside_the_lungs(tmp_path, scores):
    y, p = scores
    _fake_run(tmp_path, "none", p["perfect"], y)
    _fake_run(tmp_path, "lungs_removed", p["good"], y)
    _fake_run(tmp_path, "lungs_removed_marker", p["perfect"], y)
    _fake_run(tmp_path, "lungs_removed_marker", p["chance"], y, epochs=9)  # other settings: not this comparison
    _fake_run(tmp_path, "clahe", p["chance"], y)  # not an arm
    table = _table(tmp_path)
    assert table["arm"].tolist() == ["intact", "lungs removed", "lungs removed + marker (control)"]
    assert (table["baseline_macro_f1"] < 0.5).all() and table.loc[2, "roc_auc"] > 0.99
    text = " ".join(lungs_removed.verdicts(table))
    assert "finds the marker" in text and "still separates the classes" in text and "keeps" in text
    assert pd.isna(table.loc[0, "auc_vs_intact"]) and table.loc[1, "auc_vs_intact"] < 0
    assert table.loc[1, "auc_vs_intact_ci"][1] < 0 and "(paired)" in text  # 'good' ranks worse than 'perfect'

    shown = lungs_removed.display_table(table)
    assert list(shown.index) == table["arm"].tolist() and "(" in shown.loc["intact", "macro-F1 (95% CI)"]


def test_verdicts_at_chance_and_with_a_failed_or_missing_control(tmp_path, scores):
    y, p = scores
    _fake_run(tmp_path / "a", "lungs_removed", p["chance"], y)
    _fake_run(tmp_path / "a", "lungs_removed_marker", p["perfect"], y)
    text = " ".join(lungs_removed.verdicts(_table(tmp_path / "a")))
    assert "no better than chance" in text and "finds the marker" in text and "proves little" not in text
    _fake_run(tmp_path / "b", "lungs_removed", p["chance"], y)
    _fake_run(tmp_path / "b", "lungs_removed_marker", p["chance"], y)
    text = " ".join(lungs_removed.verdicts(_table(tmp_path / "b")))
    assert "did not reliably learn" in text and "says nothing" in text
    _fake_run(tmp_path / "d", "lungs_removed", p["chance"], y)
    _fake_run(tmp_path / "d", "lungs_removed_marker", p["perfect"] * 0.4, y)  # ranks perfectly, calls nothing COVID
    text = " ".join(lungs_removed.verdicts(_table(tmp_path / "d")))
    assert "finds the marker" in text and "not above the majority class" in text
    _fake_run(tmp_path / "c", "lungs_removed", p["good"], y)
    _fake_run(tmp_path / "c", "lungs_removed_marker", p["perfect"], y, status="failed: x")
    text = " ".join(lungs_removed.verdicts(_table(tmp_path / "c")))
    assert "No positive-control run" in text and "still separates" in text


def test_an_intact_run_alone_forms_no_comparison(tmp_path, scores):
    y, p = scores
    _fake_run(tmp_path, "none", p["good"], y)
    assert lungs_removed.find_arms(tmp_path).empty  # an intact run alone is no comparison



def test_the_featured_run_is_never_an_audit_arm(tmp_path):
    from cxrlib.book import featured_run

    for preprocess in ("lungs_removed_marker", "lungs_removed", "none"):
        cfg = RunConfig(task="multiclass", loss="focal", preprocess=preprocess)
        run = tmp_path / cfg.run_name()
        run.mkdir()
        (run / "params.json").write_text(json.dumps({"config": cfg.to_dict()}))
        (run / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.5, "per_class": {},
                                                      "macro": {"precision": 0.5, "recall": 0.5}}))
        (run / "predictions.csv").write_text("image_id\n")  # a complete run is whole (rundir.damage)
        (run / "status").write_text("complete")
    assert featured_run(tmp_path).name == "multiclass-focal-resnet50-none-s0"


def test_the_intro_states_the_experiment_of_a_bundle(tmp_path, scores):
    """The book's intro reads the lungs-removed verdict from a bundle's run roots, the `also` ones included."""
    y, p = scores
    (tmp_path / "b" / "runs").mkdir(parents=True)
    run = _fake_run(tmp_path, "none", p["perfect"], y)
    run.rename(tmp_path / "b" / "runs" / run.name)  # a bundle's runs/ holds the run folders themselves
    for arm, score in (("none", "perfect"), ("lungs_removed", "good"), ("lungs_removed_marker", "perfect")):
        _fake_run(tmp_path / "b" / "cpu", arm, p[score], y, epochs=2)
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({"name": "b", "also": {"cpu": []}}))
    text = bundle.findings_markdown(tmp_path / "b")
    assert "A model trained without lungs (chapter 4; binary task" in text and "2 epoch(s)" in text
    assert "still separates the classes" in text and "finds the marker" in text


def test_each_remedy_caches_under_its_own_settings(tmp_path, monkeypatch):
    assert preprocess.PreprocessedCache(SIZE, "lungs_removed_marker", root=tmp_path).dir == \
        preprocess.PreprocessedCache(SIZE, "lungs_removed", root=tmp_path).dir  # the marker is planted after loading
    stores = {m: preprocess.preprocess_store(m) for m in ("clahe", "lung_crop", "lungs_removed")}
    assert len(set(stores.values())) == 3
    monkeypatch.setattr(preprocess, "LUNGS_REMOVED_MARGIN", preprocess.LUNGS_REMOVED_MARGIN + 1)
    assert preprocess.preprocess_store("lungs_removed") != stores["lungs_removed"]  # a new margin, a new store


def test_repeats_with_other_seeds_are_tallied(tmp_path, scores):
    """Sets that differ only by their seed are one experiment: each keeps its table and verdicts, labelled by
    seed, and a tally says in how many seeds each verdict held; the book's intro gives only the tally."""
    y, p = scores
    root = tmp_path / "b" / "cpu"
    for seed, removed in ((0, "good"), (1, "chance")):
        for arm, score in (("none", "perfect"), ("lungs_removed", removed), ("lungs_removed_marker", "perfect")):
            run = _fake_run(tmp_path / f"s{seed}", arm, p[score], y, epochs=2)
            params = json.loads((run / "params.json").read_text())
            params["config"]["seed"] = seed
            (run / "params.json").write_text(json.dumps(params))
            (root / f"s{seed}").mkdir(parents=True, exist_ok=True)
            run.rename(root / f"s{seed}" / run.name)
    table = _table(root)
    assert table["set"].nunique() == 2 and table["experiment"].nunique() == 1 and sorted(table["seed"].unique()) == [0, 1]
    said = lungs_removed.verdicts(table)
    assert "**Binary task, seed 0.**" in said and "**Binary task, seed 1.**" in said
    tally = said[-1]
    assert tally.startswith("**Over 2 seeds (binary task, seeds 0, 1)**")
    assert "found its marker in 2 of 2" in tally and "separated the classes in 1 of 2" in tally and "paired, 2 seed(s)" in tally
    assert "ranges from −0." in tally  # typeset like every other signed difference
    config = {"task": "binary", "loss": "ce", "backbone": "resnet50", "weights": "none", "image_size": 64,
              "epochs": 2, "seed": 0, "profile": "quick"}
    assert lungs_removed.describe_settings(config).endswith(", seed 0 (profile `quick`)")
    assert lungs_removed.describe_settings(config, [1, 0]).endswith(", seeds 0, 1 (profile `quick`)")
    (tmp_path / "b" / "runs").mkdir()
    run = _fake_run(tmp_path / "paper", "none", p["perfect"], y)
    run.rename(tmp_path / "b" / "runs" / run.name)  # the bundle's own matrix
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({"name": "b", "also": {"cpu": []}}))
    text = bundle.findings_markdown(tmp_path / "b")
    assert "seeds 0, 1" in text and "Over 2 seeds" in text and "seed 1.**" not in text


def test_a_three_class_arm_names_its_auc_the_macro_one_vs_rest_and_settings_are_words():
    rows = [{"set": 0, "experiment": 0, "seed": 0, "task": task, "preprocess": pre, "roc_auc": auc,
             "roc_auc_ci": (auc - 0.05, min(auc + 0.05, 1.0)), "macro_f1": 0.5, "macro_f1_ci": (0.4, 0.6),
             "baseline_macro_f1": 0.2, "auc_vs_intact": None, "auc_vs_intact_ci": None}
            for task in ("multiclass",) for pre, auc in (("none", 0.9), ("lungs_removed", 0.8),
                                                          ("lungs_removed_marker", 0.99))]
    text = " ".join(lungs_removed.verdicts(pd.DataFrame(rows)))
    assert "macro one-vs-rest ROC AUC 0.800 (0.750–0.850)" in text
    binary = " ".join(lungs_removed.verdicts(pd.DataFrame(rows).assign(task="binary")))
    assert "macro one-vs-rest" not in binary and "ROC AUC 0.800" in binary
    config = {"task": "binary", "loss": "ce", "backbone": "resnet50", "weights": "none", "image_size": 64, "epochs": 2,
              "seed": 0, "profile": "quick"}
    said = lungs_removed.describe_settings(config)
    assert said.startswith("binary task, cross-entropy loss, ResNet50 (random init), 64 px") and "none" not in said
