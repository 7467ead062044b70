"""Results bundles and the transport copy of a data folder."""

from __future__ import annotations

import json

import numpy as np
import nbformat
import pytest
import torch
from PIL import Image

from cxrlib import bundle, transport
from cxrlib.errors import CXRError


def _run_folder(root, name, status="complete"):
    run = root / name
    run.mkdir(parents=True)
    (run / "status").write_text(status + "\n")
    (run / "params.json").write_text(json.dumps({"config": {"task": "binary"}, "device": "cpu (1 threads)",
                                                 "data": {"fingerprint": "abc", "train_class_counts": {"a": 20, "b": 10}}}))
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "git_commit": "1234", "train_seconds": 3.0,
                                                  "epochs_run": 2 if status == "complete" else 0}))
    (run / "predictions.csv").write_text("image,true,pred\n")
    (run / "model.pt").write_bytes(b"weights")
    (run / "external" / "nih").mkdir(parents=True)
    (run / "external" / "nih" / "metrics.json").write_text("{}")
    return run


def test_pack_leaves_weights_out_and_records_provenance(tmp_path):
    root = tmp_path / "runs"
    _run_folder(root, "binary-ce-a")
    _run_folder(root, "binary-focal-a", status="failed: CXRError: boom")
    (root / "matrix.json").write_text(json.dumps({"wall_seconds": 12.5, "not_run": [{"arm": "imagenet", "reason": "offline"}]}))
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"papermill": {"parameters": {"coronahack_dir": "/data/me/secret/coronahack",
                                                                        "external": "nih=/data/me/secret/nih"}}})
    nb.cells = [nbformat.v4.new_code_cell('coronahack_dir = "/data/me/secret/coronahack"\n',
                                          metadata={"tags": ["injected-parameters"]})]
    nbformat.write(nb, chapters / "05_results.ipynb")
    bench_json = tmp_path / "speed.json"
    bench_json.write_text("{}")
    experiment = tmp_path / "cpu-lungs"
    _run_folder(experiment, "binary-ce-lungs_removed")
    record = bundle.pack(root, tmp_path / "b", chapters=chapters, bench=[bench_json], also={"cpu": experiment})
    out = tmp_path / "b"
    assert [r["run"] for r in record["also"]["cpu"]] == ["binary-ce-lungs_removed"]
    assert (out / "cpu" / "binary-ce-lungs_removed" / "metrics.json").is_file()
    assert not list(out.rglob("*.pt"))
    assert (out / "runs" / "binary-ce-a" / "external" / "nih" / "metrics.json").is_file()
    assert (out / "chapters" / "05_results.ipynb").is_file() and (out / "bench" / "speed.json").is_file()
    assert record["data_fingerprints"] == ["abc"] and record["code_commit"] == "1234"
    assert record["wall_seconds"] == 12.5 and record["not_run"][0]["arm"] == "imagenet"
    assert record["aggregate_train_images_per_second"] == pytest.approx(30 * 2 / 12.5)  # 30 images x 2 epochs
    assert [r["status"] for r in record["runs"]] == ["complete", "failed: CXRError: boom"]
    assert bundle.load(out)["bytes"] == record["bytes"]
    chapter = (out / "chapters" / "05_results.ipynb").read_text()  # where the executing machine kept data stays out
    assert "/data/me" not in chapter and chapter.count("…/secret/coronahack") == 2
    assert "nih=…/secret/nih" in chapter


def test_render_copies_chapters_and_rejects_non_bundles(tmp_path):
    with pytest.raises(CXRError, match="not a results bundle"):
        bundle.render(tmp_path)
    (tmp_path / "b" / "chapters").mkdir(parents=True)
    (tmp_path / "b" / "bundle.json").write_text("{}")
    with pytest.raises(CXRError, match="no executed chapter"):
        bundle.render(tmp_path / "b", tmp_path / "gen")
    (tmp_path / "b" / "chapters" / "01_data_analysis.ipynb").write_text("{}")
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "stale.ipynb").write_text("{}")
    rendered = bundle.render(tmp_path / "b", tmp_path / "gen")
    assert [p.name for p in rendered] == ["01_data_analysis.ipynb"]
    assert not (tmp_path / "gen" / "stale.ipynb").exists()


def test_weights_survive_the_trip_in_chunks(tmp_path):
    state = {"w": torch.randn(300, 300), "steps": torch.tensor(7)}
    torch.save({"state_dict": state, "backbone": "resnet50"}, tmp_path / "model.pt")
    parts = bundle.split_weights(tmp_path / "model.pt", tmp_path / "parts", chunk_mib=0.1)
    assert len(parts) > 1 and all(p.stat().st_size <= 0.1 * 2**20 for p in parts)
    back = torch.load(bundle.join_weights(parts, tmp_path / "back.pt"), weights_only=True)
    assert back["backbone"] == "resnet50" and back["state_dict"]["w"].dtype == torch.float32
    assert torch.allclose(back["state_dict"]["w"], state["w"], rtol=1e-3, atol=1e-3)
    assert int(back["state_dict"]["steps"]) == 7


def test_transport_copy_shrinks_images_and_keeps_the_layout(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (400, 300), dtype=np.uint8)).save(src / "a" / "images" / "big.png")
    Image.fromarray(rng.integers(0, 255, (100, 80), dtype=np.uint8)).save(src / "a" / "images" / "small.jpeg")
    (src / "a" / "metadata.csv").write_text("filename\nbig.png\n")
    record = transport.transport_copy(src, tmp_path / "dst", max_side=224, quality=85)
    dst = tmp_path / "dst" / "a"
    assert record["reencoded"] == 1 and record["copied"] == 1 and record["other_files"] == 1
    with Image.open(dst / "images" / "big.png") as img:
        assert max(img.size) == 224 and img.format == "JPEG"
    assert (dst / "images" / "small.jpeg").read_bytes() == (src / "a" / "images" / "small.jpeg").read_bytes()
    assert (dst / "metadata.csv").read_text() == "filename\nbig.png\n"
    assert json.loads((tmp_path / "dst" / "TRANSPORT.json").read_text())["max_side"] == 224


def test_transport_copy_names_an_unreadable_image(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.jpeg").write_bytes(b"not an image")
    with pytest.raises(CXRError, match="broken.jpeg"):
        transport.transport_copy(tmp_path / "src", tmp_path / "dst")


def test_render_writes_the_computed_verdicts_and_the_speed_table(tmp_path):
    (tmp_path / "b" / "chapters").mkdir(parents=True)
    (tmp_path / "b" / "chapters" / "05_results.ipynb").write_text("{}")
    (tmp_path / "b" / "bench").mkdir()
    (tmp_path / "b" / "bench" / "speed.json").write_text(json.dumps({
        "hardware": {"gpu": "Some GPU"},
        "figures": {"a": {"ratio": 0.81, "goal": 0.8, "met": True}, "b": None, "c": {"ratio": None}}}))
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({"name": "b", "wall_seconds": 120.0,
                                                             "runs": [{"status": "complete"}], "hardware": ["cuda: X"]}))
    bundle.render(tmp_path / "b", tmp_path / "gen")
    assert "No claim was tested" in (tmp_path / "gen" / "findings.md").read_text()
    speed = (tmp_path / "gen" / "speed.md").read_text()
    assert "| fit throughput over the bare train step | 0.81 | ≥ 0.8 | met | Some GPU |" in speed and "120 s" in speed
    assert "CPU bf16" not in speed and "| verdict |" in speed and "| met | cuda: X |" in speed  # 120 s ≤ 600 s


def _git_repo(path, ignore: str) -> None:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / ".gitignore").write_text(ignore)


def test_pack_refuses_a_destination_git_ignores(tmp_path):
    """The rule that lost an earlier bundle's 14 run folders (`runs/` matching results/<b>/runs/) is refused."""
    repo = tmp_path / "repo"
    _git_repo(repo, "runs/\n_build/\n")
    _run_folder(tmp_path / "root", "binary-ce-a")
    with pytest.raises(CXRError, match=r"git ignores .*results/b/runs/.*--scratch"):
        bundle.pack(tmp_path / "root", repo / "results" / "b")
    assert not (repo / "results" / "b").exists()  # refused before anything was written
    assert bundle.main(["pack", str(tmp_path / "root"), str(repo / "results" / "b")]) == 2
    bundle.pack(tmp_path / "root", repo / "_build" / "b", scratch=True)  # only rendered: allowed when said
    (repo / ".gitignore").write_text("/runs/\n_build/\n")  # the fixed rule: only the top-level work folder
    record = bundle.pack(tmp_path / "root", repo / "results" / "b")
    assert record["runs"][0]["run"] == "binary-ce-a"


def test_check_tracked_names_each_untracked_run_file(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    _git_repo(repo, "")
    _run_folder(tmp_path / "root", "binary-ce-a")
    (tmp_path / "root" / "binary-ce-a" / "history.csv").write_text("epoch\n1\n")
    bundle.pack(tmp_path / "root", repo / "results" / "b")
    missing = bundle.check_tracked(repo / "results" / "b")
    assert "runs/binary-ce-a/params.json" in missing and len(missing) == 4
    subprocess.run(["git", "add", "results"], cwd=repo, check=True)
    assert bundle.check_tracked(repo / "results" / "b") == []


def test_pack_names_a_missing_benchmark_file(tmp_path):
    _run_folder(tmp_path / "root", "binary-ce-a")
    with pytest.raises(CXRError, match=r"benchmark file\(s\) not found: .*speed_\*\.json"):
        bundle.pack(tmp_path / "root", tmp_path / "b", bench=[tmp_path / "speed_*.json"], scratch=True)


@pytest.mark.parametrize("record", sorted(bundle.ROOT.glob("results/*/bundle.json")), ids=lambda p: p.parent.name)
def test_every_committed_bundle_tracks_its_runs(record):
    """Each run a committed bundle.json lists has its params, metrics, predictions and history in git: a fresh
    clone renders the same book as the work tree that made it."""
    assert bundle.check_tracked(record.parent) == []


def _claim(letter: str, task: str, verdict: str) -> dict:
    return {"claim": f"{letter} something", "task": task, "verdict": verdict, "result": "–", "seeds": "–"}


def test_the_first_page_opens_with_three_computed_sentences_and_the_set_up_beside_the_papers(tmp_path):
    """The bottom line is read from the bundle's records: runs and settings from claims.json, verdicts grouped by
    claim and task, the generalisation answer from generalisation.json; the table puts the paper profile beside."""
    from cxrlib.config import PROFILES

    b = tmp_path / "b"
    b.mkdir()
    (b / "bundle.json").write_text(json.dumps({"name": "b", "hardware": ["cpu (1 threads)"],
                                               "data": [{"folder": "coronahack"}]}))
    claims = [_claim("(c)", "binary", "no evidence of a difference"), _claim("(c)", "multiclass", "supported"),
              _claim("(d)", "binary", "supported"), _claim("(d)", "multiclass", "supported"),
              _claim("(a)", "binary", "not testable here (no run)"), _claim("(a)", "multiclass", "not testable here")]
    (b / "claims.json").write_text(json.dumps({"claims": claims, "holm": "", "runs": {
        "complete": 7, "seeds": [0, 1], "epochs": [2], "epochs_run": [2], "image_size": [48],
        "inits": ["random init"], "arms": ["paper set-up"]}}))
    arms = [{"arm": "x", "learned": True, "unseen_auc": {"value": 0.41}},
            {"arm": "y", "learned": True, "unseen_auc": {"value": 0.58}},
            {"arm": "z", "learned": False, "unseen_auc": {"value": 0.99}}]  # not learned: not in the range
    (b / "generalisation.json").write_text(json.dumps({"verdict": "**Generalisation goal: not met.** No arm.",
                                                       "remedies": {"arms": arms}}))
    text = bundle.findings_markdown(b)
    first, second, third = [line for line in text.splitlines() if line and not line.startswith(("|", ":", "*C"))][:3]
    assert first.startswith("**In short.** 7 runs") and "48 px" in first and "none of the paper's pretrained" in first
    assert second.endswith("supported: (c) 3-class, (d); no evidence of a difference: (c) binary; "
                           "not testable here: (a).")
    assert third.startswith("No:") and "ROC AUC 0.41 to 0.58" in third
    assert f"| image size | {PROFILES['paper'].get('image_size', 224)} px | 48 px |" in text
    assert "| seeds | 3 per configuration | 2 per configuration |" in text
    assert text.index("**In short.**") < text.index("| initialisation |") < text.index("*Computed from")
    assert "synthetic" not in text  # its runs/ recorded no parameters: nothing says synthetic
    (b / "runs" / "synthetic").mkdir(parents=True)
    (b / "runs" / "synthetic" / "config.json").write_text(json.dumps({"task": "binary", "coronahack_dir": ""}))
    assert "cxrlib's synthetic images (they show that the code works" in bundle.findings_markdown(b)
    (b / "runs" / "real").mkdir()
    (b / "runs" / "real" / "config.json").write_text(json.dumps({"task": "binary", "coronahack_dir": "/data/ch"}))
    assert "synthetic" not in bundle.findings_markdown(b)  # some runs on real data: not the synthetic default
