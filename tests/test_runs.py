"""The run matrix keeps failed runs and lists them; the results tables compare only like with like."""

from __future__ import annotations

import json

import pytest

from cxrlib import results, runs
from cxrlib.config import profile_config


def test_matrix_is_task_x_loss_x_init(tmp_path):
    configs = runs.matrix("quick", tmp_path, {"coronahack_dir": "", "extra_covid_dir": ""}, ["none", "imagenet"])
    assert len(configs) == 8
    assert len({c.run_dir for c in configs}) == 8
    assert all(c.image_size == 64 and c.profile == "quick" for c in configs)


def test_notebook_parameters_refuse_undeclared_changes(tmp_path):
    cfg = profile_config("quick", run_dir=str(tmp_path / "r"))
    assert runs.notebook_parameters(cfg)["loss"] == cfg.loss
    cfg.weight_decay = 0.5  # not a parameter of 03_finetune: the notebook would silently use the default
    with pytest.raises(Exception, match="weight_decay"):
        runs.notebook_parameters(cfg)


@pytest.mark.slow
def test_a_failed_run_is_kept_and_listed(tmp_path):
    cfg = profile_config("quick", weights=f"file:{tmp_path / 'absent' / 'model.pt'}")
    cfg.run_dir = str(tmp_path / cfg.run_name())
    result = runs.execute_run(cfg)
    assert result.status.startswith("failed:") and "absent" in result.status
    assert (tmp_path / cfg.run_name() / "notebook.ipynb").is_file()  # the executed notebook shows the error
    listed = results.load_runs(tmp_path)
    assert list(listed.status) == [result.status]
    assert results.paper_table(listed, cfg.task).status.iloc[0] == result.status
