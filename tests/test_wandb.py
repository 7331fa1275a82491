"""W&B: an offline run holds every key the dashboard reads; the dashboard script fails offline in one line."""

import pytest
from hydra import compose, initialize_config_dir

from kvbench.run import CONFIG_DIR, execute
from kvbench.tracking import DASHBOARD_CONFIG, DASHBOARD_METRICS


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
    from scripts.wandb_dashboard import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["--entity", "someone"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs W&B online" in err[0] and "wandb login" in err[0]


def test_dashboard_groups_by_method_and_plots_budget_against_score():
    pytest.importorskip("wandb_workspaces")
    from scripts.wandb_dashboard import build_workspace

    workspace = build_workspace("someone", "kvbench", experiment="weightedkv_ppl")
    assert "method_name" in str(workspace.runset_settings.groupby)
    text = str(workspace.sections[0].panels)
    assert "budget_tokens" in text and "score/avg" in text
