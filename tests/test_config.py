"""One precedence rule (profile defaults, then what the user set) in the notebooks, the CLI and pretraining;
banners come from what runs recorded."""

from __future__ import annotations

import json
from pathlib import Path

import jupytext
import pytest
from papermill.parameterize import parameterize_notebook

from cxrlib import book, cli, config, synthetic
from cxrlib.book import banner_from_record
from cxrlib.config import PROFILES, RunConfig, data_banner, data_record
from cxrlib.errors import CXRError
from cxrlib.rundir import MATRIX, run_root

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def notebook_namespace(name: str, parameters: dict) -> dict:
    """The names a chapter's parameters cell defines after papermill injects `parameters` (nothing else runs)."""
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    for cell in nb.cells:
        cell.metadata.setdefault("tags", [])
    nb.metadata["papermill"] = {}
    nb = parameterize_notebook(nb, parameters)
    namespace: dict = {}
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            exec(cell.source, namespace)
    return namespace


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_papermill_profile_gives_that_profiles_settings(profile):
    cfg = RunConfig.from_parameters(notebook_namespace("03_finetune", {"profile": profile}))
    want = {**RunConfig().to_dict(), **PROFILES[profile]}
    assert (cfg.profile, cfg.image_size, cfg.epochs, cfg.lr, cfg.patience) == (
        profile, want["image_size"], want["epochs"], want["lr"], want["patience"])


def test_parameters_the_user_sets_win_over_the_profile():
    cfg = RunConfig.from_parameters(notebook_namespace("03_finetune", {"profile": "paper", "epochs": 3}))
    assert (cfg.image_size, cfg.epochs) == (224, 3)


@pytest.mark.parametrize("name", ["01_data_analysis", "02_chexnet_transfer", "03_finetune", "05_results"])
def test_parameters_cells_do_not_restate_defaults(name):
    """Every parameter but the profile is None (not set): RunConfig, the profile or the run record decides."""
    namespace = notebook_namespace(name, {})
    restated = {k: v for k, v in namespace.items() if not k.startswith("__") and k != "profile" and v is not None}
    assert not restated, f"{name} restates defaults {restated}"
    assert namespace["profile"] in config.PROFILE_CHOICES


def test_profiles_hold_only_what_differs_from_the_dataclass():
    """A profile value equal to the field's default would be the same default written twice."""
    for cls, profiles in ((RunConfig, PROFILES), (config.PretrainConfig, config.PRETRAIN_PROFILES)):
        for profile, values in profiles.items():
            same = {k: v for k, v in values.items() if v == config.field_default(cls, k)}
            assert not same, f"{cls.__name__} profile {profile} restates {same}"
    shared = set(RunConfig.__dataclass_fields__) & set(config.PretrainConfig.__dataclass_fields__)
    source = Path(config.__file__).read_text()
    pretrain_source = source[source.index("class PretrainConfig"):source.index("def __post_init__", source.index("class PretrainConfig"))]
    for name in ("image_size", "batch_size", "lr", "backbone", "optimizer", "scheduler", "amp", "device"):
        assert name in shared and f"{name}: " in pretrain_source
        assert f"= RunConfig.{name}" in pretrain_source, f"PretrainConfig.{name} restates RunConfig's default"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(CXRError, match="unknown profile 'fast'"):
        RunConfig.from_parameters({"profile": "fast"})


def test_pretrain_cli_takes_the_profile_then_the_flags(monkeypatch, tmp_path):
    import cxrlib.pretrain as pretrain

    seen = {}
    monkeypatch.setattr(pretrain, "pretrain", lambda cfg, out, resume, strict=False: seen.setdefault("cfg", cfg))
    assert cli.main(["pretrain", "--profile", "quick", "--epochs", "1", "--out", str(tmp_path)]) == 0
    quick = config.PRETRAIN_PROFILES["quick"]
    assert (seen["cfg"].image_size, seen["cfg"].lr, seen["cfg"].epochs) == (quick["image_size"], quick["lr"], 1)


def write_run(folder: Path, record: dict, **config_values) -> Path:
    folder.mkdir(parents=True)
    cfg = RunConfig(**config_values).to_dict()
    (folder / "params.json").write_text(json.dumps({"config": cfg, "data": {"record": record}}))
    return folder


def test_banner_comes_from_the_run_record_not_the_caller(tmp_path):
    real = data_record("0123456789abcdef", 5901, coronahack_dir="/data/coronahack")
    run = write_run(tmp_path / "r" / "a", real, task="binary", image_size=224, epochs=30, profile="paper")
    text = banner_from_record(run)
    assert "CoronaHack (folder `coronahack`)" in text and "/data/" not in text and "synthetic" not in text and "5901 images" in text
    assert "profile `paper`, 224 px, 30 epoch(s)" in text
    assert real["tag"] == "coronahack-01234567" and data_record("x" * 16, 3)["tag"] == "synthetic"
    assert "**Data: synthetic.**" in data_banner(data_record("f" * 16, 10))



def test_the_run_banner_names_what_the_folder_trained_not_the_notebooks_parameters(tmp_path):
    """`-p loss focal` and `-p loss ce` showed identical banners in chapter 3: it now names the recorded run."""
    from cxrlib import book

    record = data_record("f" * 16, 10)
    texts = {}
    for loss in ("ce", "focal"):
        run = write_run(tmp_path / loss, record, task="binary", loss=loss, weights="imagenet", seed=2, image_size=64,
                        epochs=5, profile="quick")
        (run / "metrics.json").write_text(json.dumps({"epochs_run": 3, "best_epoch": 2}))
        texts[loss] = book.run_banner(run)
    assert texts["focal"] == ("**Run: binary, focal loss, ImageNet, seed 2.** Profile `quick`, 64 px images, 3 of at "
                              "most 5 epoch(s) run, the model of epoch 2 kept.")
    assert texts["ce"] == texts["focal"].replace("focal loss", "cross-entropy loss")
    other = write_run(tmp_path / "other", record, task="binary", preprocess="clahe", extra_covid_train=False)
    assert book.run_banner(other) == ("**Run: binary, cross-entropy loss, random init, seed 0 (CLAHE, no extra "
                                      "COVID-19 images).** Profile `custom`, 224 px images, at most 10 epoch(s).")

def test_a_run_root_mixing_data_has_no_banner(tmp_path):
    write_run(tmp_path / "a", data_record("1" * 16, 10), task="binary")
    write_run(tmp_path / "b", data_record("2" * 16, 12, coronahack_dir="/c"), task="binary")
    with pytest.raises(CXRError, match="mixes runs of different data"):
        banner_from_record(tmp_path)
    with pytest.raises(CXRError, match="no run folder"):
        banner_from_record(tmp_path / "a" / "nothing")


def test_a_freeze_outside_the_choices_fails_when_the_config_is_made():
    """stage7 used to pass validation and fail only after the data had loaded."""
    with pytest.raises(CXRError, match=r"freeze='stage7': choose one of none, backbone, stage1"):
        RunConfig(freeze="stage7")


def test_fit_options_take_the_run_defaults_not_restate_them():
    """Every FitOptions field that RunConfig also has defaults to RunConfig's value, written as a reference."""
    from cxrlib import loop

    source = Path(loop.__file__).read_text()
    body = source[source.index("class FitOptions"):source.index("@classmethod", source.index("class FitOptions"))]
    shared = set(loop.FitOptions.__dataclass_fields__) & set(RunConfig.__dataclass_fields__)
    assert len(shared) >= 11
    for name in shared:
        assert f"{name}: " in body and f"= RunConfig.{name}" in body, f"FitOptions.{name} restates RunConfig's default"
        assert config.field_default(loop.FitOptions, name) == config.field_default(RunConfig, name)


def test_preprocess_choices_and_preprocessors_are_one_list():
    from cxrlib import preprocess

    assert config.CHOICES["preprocess"] == ("none", *preprocess.PREPROCESSORS)  # same names, same order


def test_the_default_run_root_is_named_by_the_runs_records_without_reading_the_data(tmp_path):
    """Chapters given no run_root used to read and de-duplicate the whole data set just to name the folder."""
    gone = tmp_path / "no-such-coronahack"  # reading it would fail: the tag can only come from the record
    record = data_record("abcdef0123456789", 10, coronahack_dir=str(gone))
    write_run(run_root("quick", record["tag"], tmp_path) / "a", record, task="binary")
    assert book.default_run_root("quick", str(gone), base=tmp_path) == tmp_path / "runs/quick/coronahack-abcdef01"
    assert book.default_run_root("quick", base=tmp_path) == tmp_path / "runs/quick/synthetic"
    # runs of two versions of the data in that folder: the records cannot decide, so the data are read (missing here)
    other = data_record("9999999999999999", 12, coronahack_dir=str(gone))
    write_run(run_root("quick", other["tag"], tmp_path) / "b", other, task="binary")
    with pytest.raises(CXRError, match="no-such-coronahack"):
        book.default_run_root("quick", str(gone), base=tmp_path)


def test_the_default_run_root_of_data_no_run_recorded_is_the_datas_fingerprint(tmp_path):
    folder = synthetic.make_coronahack(tmp_path / "coronahack", n=40)
    root = book.default_run_root("quick", str(folder), base=tmp_path)
    assert root.parent == tmp_path / "runs/quick" and root.name.startswith("coronahack-") and len(root.name) == 19


def test_chest_pretraining_names_the_folder_the_matrix_recorded_or_says_why_not(tmp_path):
    pretrained = tmp_path / "pretrain-x"
    pretrained.mkdir()
    (pretrained / "metrics.json").write_text("{}")
    (tmp_path / MATRIX).write_text(json.dumps({"arms": {"run": {"chest_xray": f"file:{pretrained / 'model.pt'}"}}}))
    assert book.chest_pretraining(tmp_path) == pretrained
    (tmp_path / MATRIX).write_text(json.dumps({"arms": {"run": {}, "not_run": {"chest_xray": {"reason": "no data"}}}}))
    with pytest.raises(CXRError, match="no data"):
        book.chest_pretraining(tmp_path)
    (tmp_path / MATRIX).write_text("{cut")
    with pytest.raises(CXRError, match="matrix.json"):
        book.chest_pretraining(tmp_path)
