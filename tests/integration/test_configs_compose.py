"""Every shipped config composes, resolves and plans (nothing loaded), and every experiment's sweep plans.

- each config of configs/{method,model,task,budget,logger} composes with the root config, resolves to a plain
  container, and `kvbench.runner.run.plan` (what a run does before loading anything) accepts it;
- each launcher of configs/hydra/launcher composes into Hydra's own config and resolves;
- each experiment: `kvbench.runner.status.expected_runs` (what `kvbench status EXP` lists) plans every job of
  its `hydra.sweeper.params` sweep; jobs land in distinct run folders unless they are the same run (equal
  hashed settings, e.g. the full cache at two budgets).

HeadKV plans only with its head-score file (HeadKV's __post_init__ loads it): method=headkv is composed with
the smoke head scores of papers/smoke/head_scores, and headkv_longbench (Llama-3-8B-Instruct, whose scores a
user brings) with a stand-in file of that name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import kvbench.runner.run
from kvbench.errors import KVBenchError
from kvbench.resources import CONFIG_DIR
from kvbench.runner.identity import hashed_settings
from kvbench.runner.status import expected_runs
from kvbench.runner.sweeps import jobs

REPO = Path(__file__).resolve().parents[2]
SMOKE_HEAD_SCORES = REPO / "papers" / "smoke" / "head_scores"
GROUPS = ["method", "model", "task", "budget", "logger"]
# experiments whose head-score file is not in the repository: {experiment: the model it is named after}
USER_HEAD_SCORES = {"headkv_longbench": "llama3-8b-instruct"}


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def group_choices() -> list:
    return [pytest.param(group, name, id=f"{group}={name}") for group in GROUPS for name in names(group)]


def extra_overrides(group: str, name: str) -> list[str]:
    if group == "method" and name == "headkv":
        return [f"paths.head_scores={SMOKE_HEAD_SCORES}"]  # the default model (tiny)'s scores
    if group == "method" and name == "duo_attention":  # a pattern for the tiny model
        return [f"method.patterns={REPO / 'tests' / 'fixtures' / 'duo_attention' / 'tiny'}"]
    if group == "method" and name == "qfilter":  # the tiny GQA model's filters (the default model has no hub id)
        return [f"method.filters={REPO / 'tests' / 'fixtures' / 'qfilter' / 'tiny'}"]
    return []


@pytest.fixture
def in_repo(monkeypatch):
    """Relative paths of the configs (papers/smoke/..., results/...) are the checkout's."""
    monkeypatch.chdir(REPO)


def test_config_dir_is_the_checkouts():
    assert CONFIG_DIR == REPO / "configs"
    assert all(names(group) for group in [*GROUPS, "experiment", "hydra/launcher"])


@pytest.mark.parametrize(("group", "name"), group_choices())
def test_group_config_composes_and_plans(group, name, in_repo):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={name}", *extra_overrides(group, name)])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(resolved, dict) and group in resolved
    if group != "logger":
        assert resolved[group], f"{group}={name} is empty"
    p = kvbench.runner.run.plan(kvbench.runner.run.resolve(cfg))
    assert p.path.is_relative_to(Path(resolved["paths"]["results"]) / "runs")
    assert p.labels["model"] == resolved["model"]["name"]
    if group == "method":
        assert p.method.name == resolved["method"]["name"]
    if group == "task":
        assert p.task is not None
    if group == "budget" and p.budget is not None:
        assert p.labels["budget"] == p.budget.label


@pytest.mark.parametrize("name", names("hydra/launcher"))
def test_launcher_config_composes(name, in_repo):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True, throw_on_missing=True)
    assert "submitit" in launcher["_target_"].lower()
    assert launcher["timeout_min"] > 0
    # the run config beside it still plans
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    kvbench.runner.run.plan(kvbench.runner.run.resolve(cfg))


@pytest.fixture
def user_head_scores(tmp_path) -> Path:
    """A head-score folder with stand-ins for the files a user brings (the smoke model's scores, renamed)."""
    folder = tmp_path / "head_scores"
    folder.mkdir()
    for model in USER_HEAD_SCORES.values():
        for variant in ("r", "r2"):
            shutil.copy(SMOKE_HEAD_SCORES / f"tiny_{variant}.json", folder / f"{model}_{variant}.json")
    return folder


@pytest.mark.parametrize("experiment", names("experiment"))
def test_experiment_sweep_plans(experiment, in_repo, user_head_scores, monkeypatch):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        base = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = {str(k): str(v) for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()}
    assert params, f"experiment {experiment} sweeps nothing (no hydra.sweeper.params)"
    assert base.experiment_name == experiment
    _, combos = jobs(params, [])

    planned = []
    real_plan = kvbench.runner.run.plan

    def recording_plan(resolved):
        p = real_plan(resolved)
        planned.append(p)
        return p

    monkeypatch.setattr(kvbench.runner.run, "plan", recording_plan)
    overrides = [f"paths.head_scores={user_head_scores}"] if experiment in USER_HEAD_SCORES else []
    runs = expected_runs(experiment, overrides)

    assert len(planned) == len(combos) >= 1  # every job of the sweep was planned
    assert len(runs) >= 1
    assert set(runs) == {p.path for p in planned}
    # one run folder per distinct run: jobs share a folder only when they are the same run
    by_path: dict[Path, list] = {}
    for p in planned:
        by_path.setdefault(p.path, []).append(hashed_settings(p.resolved))
    for path, settings in by_path.items():
        assert all(s == settings[0] for s in settings), f"{path}: different runs share one folder"
    assert len({repr(sorted(hashed_settings(p.resolved).items(), key=str)) for p in planned}) == len(runs)
    for path, resolved in runs.items():
        assert resolved["experiment_name"] == experiment
        assert path.parts[-5] == "runs"


def test_headkv_longbench_without_head_scores_says_which_file(tmp_path, monkeypatch):
    """Without the user's score file, listing headkv_longbench's runs stops with a one-line KVBenchError."""
    monkeypatch.chdir(tmp_path)  # paths.results=results: no head scores there
    with pytest.raises(KVBenchError, match="llama3-8b-instruct_r2.json"):
        expected_runs("headkv_longbench", ["method=headkv", "budget.tokens=64"])  # one job of the sweep
