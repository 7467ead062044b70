"""Does it generalise: NIH adults in the COVID task, extra negatives, external sets scored by every run,
source hold-out, the image-level remedies. Synthetic NIH-layout folders at 32 px; the real NIH rows when present."""

from __future__ import annotations

import csv
import functools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib import data, generalise, images, metrics, preprocess, readers, synthetic, train
from cxrlib.cli import build_parser
from cxrlib.config import RunConfig, external_sets
from cxrlib.errors import CXRError

pytestmark = pytest.mark.usefixtures("one_thread")

# (Finding Labels, patient, age, sex, view): two normals, two pneumonias (one with other findings), one
# finding-only row that has no class in the COVID task.
NIH_ROWS = [("No Finding", 1, 34, "F", "PA"), ("No Finding", 2, 61, "M", "AP"), ("Pneumonia", 3, 70, "M", "AP"),
            ("Edema|Infiltration|Pneumonia", 4, 45, "F", "PA"), ("Effusion", 5, 52, "M", "PA")]  # fmt: skip


def tiny_nih(root: Path, copies: int = 1, seed: int = 0) -> Path:
    """A ChestX-ray14-layout folder without official lists (like the shared NIH subset): NIH_ROWS x `copies`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(copies):
        for labels, patient, age, sex, view in NIH_ROWS:
            pid = patient + 10 * k
            name = f"{pid:08d}_000.png"
            findings = set() if labels == "No Finding" else set(labels.split("|"))
            img = synthetic.nih_image(rng, findings, synthetic._patient(rng, "pneumonia", adult=True))
            Image.fromarray(img).resize((48, 48)).save(root / "images" / name)
            rows.append([name, labels, 0, pid, age, sex, view, 2500, 2048, 0.14, 0.14])
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(synthetic.NIH_COLUMNS)
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> Path:
    return tiny_nih(tmp_path_factory.mktemp("nih"))


def test_nih_maps_into_the_covid_task_and_reports_what_it_skips(nih):
    table, report = data.read_nih(nih)
    assert list(table.columns) == readers.COLUMNS
    assert table["label"].tolist() == ["normal", "normal", "pneumonia", "pneumonia"]
    assert table["patient_id"].tolist() == ["nih:1", "nih:2", "nih:3", "nih:4"]
    assert set(table["source"]) == {"nih"} and set(table["published_split"]) == {""}
    assert table["age"].tolist() == [34.0, 61.0, 70.0, 45.0] and table["sex"].tolist() == ["F", "M", "M", "F"]
    assert table["view"].tolist() == ["PA", "AP", "AP", "PA"]
    assert table["subtype"].tolist()[2:] == ["Pneumonia", "Pneumonia with other findings"]
    assert len(report.skipped) == 1 and "Effusion" in report.skipped[0]
    assert any("no official split lists" in note for note in report.notes)


def test_nih_real_rows(real_data):
    root = real_data / "nih-chestxray14-subset"
    if not (root / "Data_Entry_2017.csv").is_file():
        pytest.skip(f"no NIH subset at {root}")
    meta = pd.read_csv(root / "Data_Entry_2017.csv", dtype=str)
    table, report = data.read_nih(root)
    pneumonia = meta["Finding Labels"].str.split("|").map(lambda labels: "Pneumonia" in labels)
    normal = meta["Finding Labels"] == "No Finding"
    assert len(table) + len(report.skipped) + len(report.missing) == len(meta)
    assert (table["label"] == "normal").sum() == normal.sum() and (table["label"] == "pneumonia").sum() == pneumonia.sum()
    assert table["patient_id"].nunique() == meta.loc[normal | pneumonia, "Patient ID"].nunique()
    assert table["age"].notna().all() and set(table["view"]) <= {"AP", "PA"} and set(table["sex"]) <= {"M", "F"}
    assert not (table["label"] == "covid").any()


def test_extra_negatives_join_the_table_with_their_own_patients(nih):
    base, _ = data.load_table()
    table, report = data.load_table(extra_negatives=str(nih))
    nih_rows = table[table["source"] == "nih"]
    assert len(table) == len(base) + 4 and len(nih_rows) == 4
    assert set(nih_rows["patient_id"]) == {"nih:1", "nih:2", "nih:3", "nih:4"}
    split = data.split_table(table, "binary", seed=0)
    data.check_no_leakage(split)


def test_extra_negatives_refuse_covid_rows(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,covid\n")
    with pytest.raises(CXRError, match="labelled covid"):
        data.read_extra_negatives(tmp_path / "m.csv")
    with pytest.raises(CXRError, match="cannot tell its layout"):
        data.read_any(tmp_path)


def test_cli_flags_and_papermill_names_of_the_new_parameters(nih):
    args = build_parser().parse_args(["train", "--extra-negatives", str(nih), "--external", f"nih={nih}",
                                      "--hold-out", "country=Italy", "--preprocess", "clahe"])  # fmt: skip
    assert (args.extra_negatives, args.external, args.hold_out, args.preprocess) == (
        str(nih), f"nih={nih}", "country=Italy", "clahe")
    cfg = RunConfig.from_parameters({"extra_negatives": str(nih), "preprocess": "lung_crop", "hold_out": "site=sirm.org"})
    assert cfg.run_name() == "multiclass-ce-resnet50-none-negs-holdout-site_sirm.org-lung_crop-s0"
    assert external_sets("nih=/a, other=/b.csv") == {"nih": "/a", "other": "/b.csv"}
    for bad in ({"external": "nih"}, {"external": "a=/x,a=/y"}, {"preprocess": "sharpen"}, {"hold_out": "Italy"}):
        with pytest.raises(CXRError):
            RunConfig(**bad)


def test_hold_out_sends_a_source_to_test_only():
    table, _ = data.load_table()
    sizes = data.source_sizes(table, min_images=1)
    assert {"column", "value", "images", "patients", "hold_out", "enough"} <= set(sizes.columns)
    spec = sizes.loc[sizes["column"] == "country", "hold_out"].iloc[0]
    split = data.split_table(table, "multiclass", seed=0, hold_out=spec)
    held = data.held_out(table, spec)
    assert held.any() and (split.loc[held.to_numpy(), "split"] == "test").all()
    assert not split.loc[~held.to_numpy(), "patient_id"].isin(split.loc[held.to_numpy(), "patient_id"]).any()
    assert any(spec in note for note in split.attrs["notes"])
    with pytest.raises(CXRError, match="no image has"):
        data.split_table(table, "multiclass", hold_out="country=atlantis")
    with pytest.raises(CXRError, match="column one of"):
        data.held_out(table, "patient_id=1")


def test_clahe_equalises_contrast_and_lung_crop_cuts_the_border():
    rng = np.random.default_rng(0)
    dull = (100 + 20 * rng.random((64, 80))).astype(np.uint8)  # a low-contrast image
    out = preprocess.clahe(dull)
    assert out.shape == dull.shape and out.dtype == np.uint8 and out.std() > 3 * dull.std()
    assert np.array_equal(preprocess.clahe(dull), out)
    img = synthetic.chest_image(rng, "normal", synthetic._patient(rng, "normal", adult=True))
    crop = preprocess.lung_crop(img)
    assert crop.shape[0] < img.shape[0] and crop.shape[1] < img.shape[1]


def test_preprocessed_cache_is_its_own_store_and_matches_prediction_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLIB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "x.png"
    rng = np.random.default_rng(1)
    Image.fromarray(synthetic.chest_image(rng, "covid", synthetic._patient(rng, "covid", adult=True))).save(path)
    plain, clahe = preprocess.make_cache(32), preprocess.make_cache(32, "clahe")
    assert plain.dir != clahe.dir
    a, b = plain.load([path])[0][0], clahe.load([path])[0][0]
    assert not np.array_equal(a, b)
    assert np.array_equal(b, preprocess.load_preprocessed(path, 32, "clahe"))
    assert np.array_equal(a, preprocess.load_preprocessed(path, 32))


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """Two 1-epoch 32 px runs on a tiny manifest: the paper set-up and adult negatives, both with external sets."""
    from test_train import tiny_manifest

    root = tmp_path_factory.mktemp("gen")
    negatives, outside = tiny_nih(root / "negatives", copies=3, seed=1), tiny_nih(root / "outside", seed=2)
    common = dict(manifest=str(tiny_manifest(root / "m")), image_size=32, epochs=1, batch_size=8, patience=0,
                  device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.metrics, "compute_metrics", functools.partial(metrics.compute_metrics, n_boot=20))
        train.run(RunConfig(**common, external=f"nih={outside}", run_dir=str(root / "runs" / "paper")), progress=False)
        train.run(RunConfig(**common, extra_negatives=str(negatives), external=f"nih={outside},again={negatives}",
                            run_dir=str(root / "runs" / "negs")), progress=False)  # fmt: skip
    return root / "runs"


def test_every_run_scores_its_external_sets_on_unseen_images(run_root):
    run_dir = run_root / "negs"
    params = json.loads((run_dir / "params.json").read_text())
    assert params["data"]["summary"]["sources"]["train"].get("nih", 0) > 0
    m = json.loads((run_dir / "external" / "nih" / "metrics.json").read_text())
    pred = pd.read_csv(run_dir / "external" / "nih" / "predictions.csv")
    assert m["n"] == 4 == len(pred) and set(pred["source"]) == {"nih"}
    assert m["threshold_from_validation"] == json.loads((run_dir / "metrics.json").read_text())["threshold_selection"]["threshold"]
    assert m["covid_specificity"] is not None and m["covid_sensitivity"] is None
    # the set the run trained on: only its test-split images are scored
    again = pd.read_csv(run_dir / "external" / "again" / "predictions.csv")
    test_ids = set(pd.read_csv(run_dir / "predictions.csv")["image_id"])
    assert set(again["image_id"]) == {i for i in test_ids if i.startswith("nih/")}


def test_chapter_06_measures_read_run_folders_and_mark_what_is_no_evidence(run_root):
    arms = generalise.load_arms(run_root).set_index("run")
    assert arms.loc["paper", "arm"] == "paper set-up" and arms.loc["negs", "arm"] == "adult negatives"
    assert arms.loc["negs", "label"] == "adult negatives" and "random init" in arms.loc["paper", "run_name"]
    table = generalise.measures(arms.reset_index())  # ages re-read from where the runs found their data
    runs = table[table["level"] == "run"]
    ext = runs[runs["population"] == "NIH ChestX-ray14 adults without COVID-19"].set_index("arm")
    assert ext.loc["paper set-up", "evidence"] and not ext.loc["adult negatives", "evidence"]
    assert "trained on nih" in ext.loc["adult negatives", "note"]
    assert (ext["n"] == 4).all() and not ext["enough"].any()  # 4 adults (NIH_ROWS): too few to say
    assert ext.loc["paper set-up", "verdict"] == "too few to say" and ext.loc["adult negatives", "verdict"] == ""
    m = json.loads((run_root / "paper" / "metrics.json").read_text())  # the same operating point as chapter 5
    own = runs[(runs["run"] == "paper") & (runs["population"] == generalise.OWN)].set_index("metric")
    assert own.loc["covid_specificity", "value"] == pytest.approx(m["at_threshold"]["covid_specificity"])
    text = generalise.goal_verdict(table)
    assert "**held-out source**: not run." in text and "**remedy**: not run." in text
    assert "NIH ChestX-ray14 adults without COVID-19: too few images to say (n=4)" in text
    assert "0.000" not in text and "nan" not in text.lower() and "[" not in text
    by_sex = generalise.external_subgroups(run_root / "paper", "nih", "sex").set_index("sex")
    assert set(by_sex.index) == {"F", "M"} and by_sex.loc["F", "specificity"] == "too few to say (n=2)"
    assert list(by_sex.columns) == ["images", "specificity"]  # no COVID-19 image: no column of "none", no accuracy
    with pytest.raises(CXRError, match="no external set 'elsewhere'"):
        generalise.external_subgroups(run_root / "paper", "elsewhere")


# --- chapter 06 on run folders written by hand: small synthetic predictions tables ---------------------


def write_nih_meta(root: Path, ages: dict[str, float]) -> Path:
    """A ChestX-ray14-layout folder (Data_Entry_2017.csv + 8 px images) of "No Finding" images with these ages."""
    (root / "images").mkdir(parents=True)
    rows = []
    for k, (name, age) in enumerate(ages.items()):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / name)
        rows.append([name, "No Finding", 0, 1000 + k, age, "F", "PA", 8, 8, 0.1, 0.1])
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        csv.writer(f).writerows([synthetic.NIH_COLUMNS, *rows])
    return root


def prediction_rows(images: list[tuple[str, str, str, str, float]]) -> pd.DataFrame:
    """A binary run's predictions.csv from (image_id, patient_id, source, true, p_covid) tuples."""
    frame = pd.DataFrame(images, columns=["image_id", "patient_id", "source", "true", "p_covid"])
    return frame.assign(path=frame["image_id"], split="test", p_non_covid=1 - frame["p_covid"],
                        pred=np.where(frame["p_covid"] >= 0.5, "covid", "non_covid"))[
        ["image_id", "path", "patient_id", "source", "split", "true", "pred", "p_non_covid", "p_covid"]]


def fake_run(root: Path, name: str, test: list, external: dict[str, tuple[str, list]] | None = None,
             trained: tuple[str, ...] = ("coronahack", "ieee8023"), held_out: tuple[str, ...] = (),
             threshold: float = 0.5, **config) -> Path:
    """A complete binary run folder written by hand: its test predictions, external sets {name: (where, rows)}
    scored at `threshold` (its validation threshold), the sources it trained on and its held-out images."""
    run_dir = root / name
    (run_dir / "external").mkdir(parents=True)
    external = external or {}
    cfg = RunConfig(task="binary", coronahack_dir=str(root / "nowhere"),
                    external=",".join(f"{k}={where}" for k, (where, _) in external.items()), **config)
    classes = ["non_covid", "covid"]
    (run_dir / "params.json").write_text(json.dumps({"config": cfg.to_dict(), "data": {
        "summary": {"sources": {"train": {s: 10 for s in trained}}}, "held_out_images": list(held_out)}}))
    prediction_rows(test).to_csv(run_dir / "predictions.csv", index=False)
    (run_dir / "metrics.json").write_text(json.dumps({"classes": classes, "n": len(test),
                                                      "threshold_selection": {"threshold": threshold}}))
    for ext, (_, rows) in external.items():
        (run_dir / "external" / ext).mkdir()
        prediction_rows(rows).to_csv(run_dir / "external" / ext / "predictions.csv", index=False)
        (run_dir / "external" / ext / "metrics.json").write_text(json.dumps(
            {"classes": classes, "n": len(rows), "threshold_from_validation": threshold}))
    (run_dir / "status").write_text("complete")
    return run_dir


def own_split(n_negatives: int = 12, n_covid: int = 12, called: float = 0.9) -> list:
    """A test split: Guangzhou children without COVID-19 (called right) and ieee8023 adults with COVID-19."""
    return ([(f"coronahack/k{i}.jpeg", f"kermany:{i}", "coronahack", "non_covid", 0.1) for i in range(n_negatives)]
            + [(f"ieee8023/c{i}.jpg", f"ieee8023:c{i}", "ieee8023", "covid", called) for i in range(n_covid)])


def nih_rows(ages: dict[str, float], p_adult: list[float], p_child: float = 0.9) -> list:
    """NIH predictions: adults (age >= 18) get `p_adult` in turn, children and unknown ages `p_child`."""
    adults = iter(p_adult)
    return [(f"nih/{name}", f"nih:{1000 + k}", "nih", "non_covid",
             next(adults) if 18 <= age <= 120 else p_child) for k, (name, age) in enumerate(ages.items())]


NIH_AGES = {**{f"a{i:02d}.png": 18.0 + 2 * i for i in range(20)},  # 20 adults, the youngest exactly 18
            **{f"c{i}.png": age for i, age in enumerate((4, 9, 12, 17))},  # 4 children, the oldest 17
            "u0.png": 414, "u1.png": 150}  # impossible ages (the 2017 CSV has some): age unknown


def test_nih_children_are_reported_apart_and_never_count_as_adults(tmp_path):
    nih = write_nih_meta(tmp_path / "nih", NIH_AGES)
    rows = nih_rows(NIH_AGES, [0.1] * 17 + [0.9] * 3)  # 17 of 20 adults called right; every child called COVID-19
    fake_run(tmp_path / "runs", "paper", own_split(), external={"nih": (str(nih), rows)})
    arms = generalise.load_arms(tmp_path / "runs")
    ages, notes = generalise.read_ages(arms)
    assert ages["nih/a00.png"] == 18 and ages["nih/c3.png"] == 17 and np.isnan(ages["nih/u0.png"])
    assert len(notes) == 1 and "own data" in notes[0]  # the run's own data is not on this machine: said so
    table = generalise.measures(arms, ages)
    nih_pop = table[(table["level"] == "run") & table["population"].str.startswith("NIH")].set_index("group")
    assert nih_pop["n"].to_dict() == {"adults": 20, "children": 4, "age unknown": 2}
    assert nih_pop.loc["adults", "value"] == pytest.approx(17 / 20) and nih_pop.loc["children", "value"] == 0
    assert nih_pop.loc["adults", "goal"] == 0.8 and nih_pop["goal"].drop("adults").isna().all()
    assert nih_pop.loc["children", "population"] == "NIH ChestX-ray14 children (under 18) without COVID-19"
    shown = generalise.summary_for_reading(generalise.summary(table)).set_index("population")
    assert shown.loc["NIH ChestX-ray14 children (under 18) without COVID-19", "goal"] == "none: not adults"
    assert shown.loc["NIH ChestX-ray14 adults without COVID-19", "images"] == 20
    assert generalise.OWN not in shown.index  # the sources it trained on: in the details, not the summary

    # Without the metadata no image is an adult: the ages are unknown, and the note says where to point
    ages, notes = generalise.read_ages(arms, where={"nih": str(tmp_path / "elsewhere")})
    assert any("external_dirs=nih=" in n for n in notes) and not ages.index.str.startswith("nih/").any()
    table = generalise.measures(arms, ages)
    assert set(table.loc[table["population"].str.startswith("NIH"), "group"]) == {"age unknown"}
    # predictions that carry their own age need no metadata
    scored = tmp_path / "runs" / "paper" / "external" / "nih" / "predictions.csv"
    pred = pd.read_csv(scored)
    pred.assign(age=pred["image_id"].str.removeprefix("nih/").map(NIH_AGES).where(lambda a: a <= 120)).to_csv(scored)
    table = generalise.measures(arms, ages)
    nih_pop = table[(table["level"] == "run") & table["population"].str.startswith("NIH")].set_index("group")
    assert nih_pop["n"].to_dict() == {"adults": 20, "children": 4, "age unknown": 2}


def test_goal_word_reads_the_ends_of_the_interval():
    def word(low, high, goal=0.8, enough=True):
        return generalise.goal_word({"ci_low": low, "ci_high": high, "goal": goal, "enough": enough})

    assert word(0.80, 0.95) == "met"  # the lower end reaches the goal
    assert word(0.60, 0.7999) == "not met"  # the upper end misses it
    assert word(0.70, 0.85) == "undecided" and word(0.79, 0.80) == "undecided"
    assert word(0.9, 1.0, enough=False) == "too few to say" and word(0.9, 1.0, goal=np.nan) == ""


def test_intervals_are_never_narrower_than_wilson_or_the_patient_bootstrap():
    from cxrlib.audit import wilson

    one_each = pd.DataFrame({"image_id": range(20), "patient_id": range(20), "hit": [True] * 17 + [False] * 3})
    e = generalise.estimate(one_each)
    low, high = wilson(17, 20)
    assert e["value"] == pytest.approx(0.85) and e["n"] == 20 and e["n_patients"] == 20 and e["enough"]
    assert e["ci_low"] <= low + 1e-12 and e["ci_high"] >= high - 1e-12
    assert generalise.wilson_interval(0.85, 20) == pytest.approx((low, high))
    # two patients of 10 images each, one all right, one all wrong: 20 images, but only 2 independent patients
    clustered = pd.DataFrame({"image_id": range(20), "patient_id": [0] * 10 + [1] * 10,
                              "hit": [True] * 10 + [False] * 10})
    c = generalise.estimate(clustered)
    assert c["value"] == 0.5 and c["ci_low"] == 0 and c["ci_high"] == 1  # far wider than Wilson on 20 images
    # two runs calling the same 20 images: 20 images, not 40
    assert generalise.estimate(pd.concat([one_each, one_each]))["n"] == 20
    assert generalise.estimate(one_each.iloc[:0])["n"] == 0


def test_intervals_read_0_460_0_290_0_650_everywhere():
    row = {"value": 0.85, "ci_low": 0.64, "ci_high": 0.948, "n": 20, "enough": True}
    assert generalise.fmt(row) == "0.850 (0.640–0.948), n=20"
    assert generalise.fmt(row, n=False) == "0.850 (0.640–0.948)"
    assert generalise.fmt({**row, "n": 4, "enough": False}) == "too few to say (n=4)"
    assert generalise.fmt({**row, "value": np.nan, "n": 0, "enough": False}) == "none (n=0)"


def test_pooled_verdicts_say_their_runs_and_seeds_and_when_the_runs_disagree(tmp_path):
    adults = {f"a{i:03d}.png": 40.0 for i in range(200)}
    ages = pd.Series(40.0, index=[f"nih/{name}" for name in adults])  # as read_ages gives them
    for seed in range(10):  # nine runs call every adult right, one only 140 of 200
        p = [0.1] * 200 if seed else [0.1] * 140 + [0.9] * 60
        fake_run(tmp_path, f"paper-s{seed}", own_split(), external={"nih": ("/elsewhere", nih_rows(adults, p))},
                 seed=seed)
    table = generalise.measures(generalise.load_arms(tmp_path), ages)
    nih = table[table["population"] == "NIH ChestX-ray14 adults without COVID-19"]
    assert nih.loc[nih["level"] == "run", "verdict"].tolist() == ["not met"] + ["met"] * 9
    pooled = nih[nih["level"] == "arm"].iloc[0]
    assert pooled["value"] == pytest.approx(0.97) and pooled["ci_low"] > 0.8  # the pool alone would say met
    assert pooled["runs"] == 10 and pooled["seeds"] == ", ".join(map(str, range(10)))
    assert pooled["per_run"] == "9 met, 1 not met" and pooled["verdict"] == "undecided"  # but one run misses it
    assert generalise.summary(table)["arm_runs"].iloc[0] == "paper set-up (10 runs, seeds 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"
    shown = generalise.summary_for_reading(generalise.summary(table)).set_index("population")
    row = shown.loc["NIH ChestX-ray14 adults without COVID-19"]
    assert row["runs"] == "10 runs, seeds 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    assert row["runs' own verdicts"] == "9 met, 1 not met"
    assert re.fullmatch(r"0\.970 \(0\.\d{3}–0\.\d{3}\)", row["estimate (95% CI)"])
    text = generalise.goal_verdict(table)
    assert text.startswith("**Generalisation goal: undecided.** paper set-up (10 runs, seeds 0, 1, 2, 3, 4, 5, 6, 7, 8, "
                           "9): undecided. The goal, on sources a model never trained on")
    assert "(the runs one by one: 9 met, 1 not met)" in text
    counts = generalise.population_counts(table)
    assert "paper set-up | NIH ChestX-ray14 adults without COVID-19 | specificity | 200 images | 10 runs" in counts
    assert not re.search(r"\d\.\d", counts) and "met" not in counts  # no estimate, no verdict: the same on any machine


def test_the_goal_needs_both_measures_on_unseen_sources(tmp_path):
    nih = write_nih_meta(tmp_path / "nih", NIH_AGES)
    held = [f"ieee8023/h{i}.jpg" for i in range(40)]
    test = own_split() + [(i, f"ieee8023:{i}", "ieee8023", "covid", 0.99) for i in held]
    fake_run(tmp_path / "a", "held", test, external={"nih": (str(nih), nih_rows(NIH_AGES, [0.01] * 20))},
             held_out=tuple(held), hold_out="country=italy")
    arms = generalise.load_arms(tmp_path / "a")
    assert arms["label"].tolist() == ["held-out source: country=italy"]
    ages = generalise.read_ages(arms)[0]
    text = generalise.goal_verdict(generalise.measures(arms, ages))
    assert text.startswith("**Generalisation goal: met.** Met by held-out source: country=italy (1 run, seed 0). ")
    assert ("COVID-19 images of the held-out source (country=italy): COVID-19 sensitivity 1.000 (0.912–1.000), n=40, "
            "met") in text
    # the paper set-up alone: specificity met, but no COVID-19 sensitivity on an unseen source -> undecided
    fake_run(tmp_path / "b", "paper", own_split(), external={"nih": (str(nih), nih_rows(NIH_AGES, [0.01] * 20))})
    arms_b = generalise.load_arms(tmp_path / "b")
    text = generalise.goal_verdict(generalise.measures(arms_b, generalise.read_ages(arms_b)[0]))
    assert text.startswith("**Generalisation goal: undecided.** paper set-up (1 run, seed 0): undecided. ")
    assert "no COVID-19 sensitivity measured on a source it never trained on" in text
    # one measure not met is enough to miss it
    fake_run(tmp_path / "c", "paper", own_split(), external={"nih": (str(nih), nih_rows(NIH_AGES, [0.99] * 20))})
    arms_c = generalise.load_arms(tmp_path / "c")
    text = generalise.goal_verdict(generalise.measures(arms_c, generalise.read_ages(arms_c)[0]))
    assert text.startswith("**Generalisation goal: not met.** No arm meets it: paper set-up (1 run, seed 0). ")
    assert "specificity 0.000 (0.000–0.161), n=20, not met" in text and "\n" not in text.split("\n\n")[0]


def test_arms_and_runs_are_named_in_words():
    label = generalise.arm_label
    assert label({}) == "paper set-up" and label({"extra_negatives": "/nih"}) == "adult negatives"
    assert label({"hold_out": "country=italy"}) == "held-out source: country=italy"
    assert label({"preprocess": "clahe"}) == "CLAHE" and label({"preprocess": "lungs_removed"}) == "lungs removed"
    assert label({"extra_negatives": "/nih", "preprocess": "clahe"}) == "adult negatives + CLAHE"
    assert label({"extra_covid_train": False, "weighted_sampler": False}) == (
        "paper set-up, without weighted sampling, no extra COVID-19 images")
    assert generalise.run_words({"task": "binary", "loss": "focal", "weights": "none", "seed": 2}) == (
        "binary, focal loss, random init, seed 2")
    assert "ImageNet" in generalise.run_words({"task": "multiclass", "loss": "ce", "weights": "imagenet"})


def test_forest_draws_one_row_per_measure_and_the_goal_lines():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from cxrlib import plots

    def row(label, population, metric, value, low, high, verdict, enough=True):
        return {"label": label, "population": population, "metric": metric, "value": value, "ci_low": low,
                "ci_high": high, "verdict": verdict, "enough": enough}

    long = "held-out source: country=italy + adult negatives + CLAHE, without weighted sampling"
    table = pd.DataFrame([
        row("paper set-up", "NIH ChestX-ray14 adults without COVID-19", "covid_specificity", 0.12, 0.09, 0.14,
            "not met"),
        row("paper set-up", "NIH ChestX-ray14 children (under 18) without COVID-19", "covid_specificity", 0.2, 0.1,
            0.3, ""),
        row(long, "ieee8023 adults without COVID-19 (test split)", "covid_specificity", 0.5, 0.1, 0.9, "too few to say",
            enough=False),
        row(long, "COVID-19 images of the held-out source (country=italy)", "covid_sensitivity", 0.93, 0.88, 0.97,
            "undecided"),
        row("adult negatives", "NIH ChestX-ray14 COVID-19 images", "covid_sensitivity", np.nan, np.nan, np.nan, "")])
    fig = plots.forest(table, generalise.GOAL)
    fig.canvas.draw()
    ticks = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert len(ticks) == len(table)
    assert ticks[0].replace("\n", " ") == "paper set-up NIH ChestX-ray14 adults without COVID-19"
    goals = sorted(line.get_xdata()[0] for ax in fig.axes for line in ax.lines if line.get_gid() == "goal")
    assert goals == [0.8, 0.9]
    assert all(ax.get_xlabel() and "goal" in ax.get_title(loc="left") for ax in fig.axes)
    box = fig.bbox
    hidden = {t.label1 for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in axis.get_major_ticks()
              if not min(axis.get_view_interval()) - 1e-9 <= t.get_loc() <= max(axis.get_view_interval()) + 1e-9}
    for text in fig.findobj(Text):  # every drawn text (tick labels outside the axis range are not drawn)
        if text.get_visible() and text.get_text().strip() and text not in hidden:
            e = text.get_window_extent()
            assert e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1, text
            assert text.get_fontsize() >= 10, text.get_text()
    only_spec = plots.forest(table.iloc[:2], generalise.GOAL)
    assert [line.get_xdata()[0] for ax in only_spec.axes for line in ax.lines if line.get_gid() == "goal"] == [0.8]
    plt.close("all")


def test_load_arms_leaves_the_lungs_removed_audit_to_chapter_04(tmp_path):
    for preprocess in ("none", "lungs_removed", "lungs_removed_marker"):
        run = tmp_path / preprocess
        run.mkdir()
        (run / "params.json").write_text(json.dumps({"config": RunConfig(preprocess=preprocess).to_dict()}))
        (run / "metrics.json").write_text("{}")  # a complete folder holds its result files (rundir.RESULT_FILES)
        (run / "predictions.csv").write_text("image_id\n")
        (run / "status").write_text("complete")
    assert generalise.load_arms(tmp_path)["preprocess"].tolist() == ["none"]


def test_the_summary_is_saved_for_the_first_page(tmp_path):
    """generalisation.json carries the verdict and, per arm, the share of adults called COVID-19 (1 − specificity)."""
    from cxrlib import generalise

    record = {"verdict": "**Generalisation goal: not met.** ...", "measures": [
        {"arm_runs": "paper set-up (4 runs, seed 0)", "population": "NIH ChestX-ray14 adults without COVID-19",
         "group": "adults", "metric": "covid_specificity", "value": 0.15, "ci_low": 0.125, "ci_high": 0.176, "n": 817},
        {"arm_runs": "paper set-up (4 runs, seed 0)", "population": "children", "group": "children",
         "metric": "covid_specificity", "value": 0.3, "ci_low": 0.2, "ci_high": 0.4, "n": 92}]}
    said = generalise.called_covid(record)
    assert said == ['paper set-up (4 runs, seed 0) called a share of 0.850 (0.824–0.875) of the 817 NIH ChestX-ray14 '
                    'adults without COVID-19 "COVID-19"']  # children are reported apart, not here
    empty = generalise.save_summary(generalise.measures(generalise.load_arms(tmp_path)), tmp_path / "g.json")
    assert json.loads(empty.read_text())["measures"] == []
