"""W&B: an offline run holds every key the dashboard reads; the dashboard script fails offline in one line."""

import time

import pytest
from hydra import compose, initialize_config_dir

from kvbench.resources import CONFIG_DIR
from kvbench.runner.run import execute
from kvbench.runner.tracking import DASHBOARD_CONFIG, DASHBOARD_METRICS


def test_offline_run_holds_the_dashboard_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = ["logger=wandb", f"paths.results={tmp_path}", "experiment_name=dash", "task.context_tokens=300",
                 "task.num_samples=2", "method=h2o", "budget.tokens=64"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        execute(compose("config", overrides=overrides))
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # wandb has no offline reader any more: the keys are in the protobuf bytes
    for key in (*DASHBOARD_CONFIG, *DASHBOARD_METRICS, "score/passkey", "dash"):
        assert key.encode() in data, key


def test_dashboard_script_offline_is_one_clear_line(monkeypatch, capsys):
    from kvbench.report.dashboard import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["--entity", "someone"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs W&B online" in err[0] and "wandb login" in err[0]


def test_dashboard_groups_by_method_and_plots_budget_against_score():
    pytest.importorskip("wandb_workspaces")
    from kvbench.report.dashboard import build_workspace

    workspace = build_workspace("someone", "kvbench", experiment="weightedkv_ppl")
    assert "method_name" in str(workspace.runset_settings.groupby)
    text = str(workspace.sections[0].panels)
    assert "budget_tokens" in text and "score/avg" in text


def test_a_resumed_run_continues_its_wandb_run_and_a_killed_one_is_marked_failed(tmp_path, monkeypatch):
    import json

    import wandb

    from kvbench.tasks.synthetic import Passkey

    monkeypatch.setenv("WANDB_MODE", "offline")
    exit_codes = []
    finish = wandb.Run.finish

    def spy(self, exit_code=None, **kwargs):
        exit_codes.append(exit_code)
        return finish(self, exit_code=exit_code, **kwargs)

    monkeypatch.setattr(wandb.Run, "finish", spy)
    original = Passkey.record
    calls = {"n": 0}

    def dies_after_one(self, sample, *args):  # a sample's record, whatever the batch size
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, sample, *args)

    overrides = ["logger=wandb", f"paths.results={tmp_path}", "task.context_tokens=300", "task.num_samples=2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    monkeypatch.setattr(Passkey, "record", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg)
    assert exit_codes == [1]  # finished as failed, not as a clean (empty) run
    (kept,) = (tmp_path / "runs").glob("*/*/*/*/wandb.json")
    run_id = json.loads(kept.read_text())["id"]
    monkeypatch.setattr(Passkey, "record", original)
    time.sleep(1.1)  # W&B names an offline session's folder by the second it started: keep the two apart
    execute(cfg)
    assert exit_codes == [1, 0]
    assert json.loads(kept.read_text())["id"] == run_id
    sessions = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2  # both sessions logged to the same W&B run id
