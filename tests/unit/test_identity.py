"""Run identity: which settings name a run folder (kvbench/identity.py), and that `num_samples` reuses it."""

import copy

from kvbench.runner.identity import hashed_settings, run_id

BASE = {
    "model": {"name": "tiny", "asset": "tiny-llama", "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa",
              "chat_format": "none", "max_prompt_tokens": 2048, "seed": 0},
    "task": {"name": "passkey", "context_tokens": 300, "num_samples": 20, "limit": None, "seed": 0},
    "method": {"name": "streamingllm", "sinks": 4, "stage": "prefill", "positions": "original"},
    "budget": {"tokens": 64, "ratio": None},
    "seed": 0,
    "paths": {"results": "/somewhere/results", "head_scores": "/somewhere/results/head_scores"},
    "logger": {"name": "wandb", "mode": "offline"},
    "run": {"tag": None},
    "experiment_name": None,
}


def changed(path: str, value) -> dict:
    cfg = copy.deepcopy(BASE)
    node = cfg
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return cfg


def test_run_id_is_eight_hex_digits_and_stable():
    rid = run_id(BASE)
    assert len(rid) == 8 and int(rid, 16) >= 0
    assert run_id(copy.deepcopy(BASE)) == rid
    reordered = {k: BASE[k] for k in reversed(list(BASE))}  # key order does not matter
    assert run_id(reordered) == rid


def test_settings_that_change_results_change_the_id():
    rid = run_id(BASE)
    for path, value in [("task.context_tokens", 400), ("method.stage", "decode"), ("method.positions", "shifted"),
                        ("method.sinks", 0), ("budget.tokens", 32), ("seed", 1), ("model.dtype", "bfloat16"),
                        ("model.attn_implementation", "eager"), ("model.max_prompt_tokens", 1024),
                        ("model.chat_format", "llama2"), ("model.path", "org/other")]:
        assert run_id(changed(path, value)) != rid, path


def test_settings_that_only_say_how_many_where_or_how_do_not():
    rid = run_id(BASE)
    for path, value in [("task.num_samples", 50), ("task.limit", 3), ("model.device", "cuda"),
                        ("paths.results", "/elsewhere"), ("logger.name", "none"), ("run.tag", "x"),
                        ("experiment_name", "demo")]:
        assert run_id(changed(path, value)) == rid, path
    sharded = {**copy.deepcopy(BASE), "run": {"tag": None, "shard": 2, "num_shards": 4}}  # any run.* key
    assert run_id(sharded) == rid


def test_full_cache_ignores_the_budget_and_paths_under_results_are_relative():
    full = changed("method", {"name": "full"})
    assert run_id(full) == run_id({**full, "budget": {"tokens": 999, "ratio": None}})
    a = changed("method", {"name": "headkv", "head_scores": "/somewhere/results/head_scores/tiny_r2.json"})
    b = changed("method", {"name": "headkv", "head_scores": "/other/results/head_scores/tiny_r2.json"})
    b["paths"]["results"] = "/other/results"
    assert hashed_settings(a)["method"]["head_scores"] == "${paths.results}/head_scores/tiny_r2.json"
    assert run_id(a) == run_id(b)


def test_differing_settings_label_runs_that_share_their_readable_parts():
    from kvbench.runner.identity import differing_settings

    demo = hashed_settings(changed("task.depth_max", 0.5))
    default = hashed_settings(changed("task.depth_max", 1.0))
    assert differing_settings([demo, default]) == ["task.depth_max=0.5", "task.depth_max=1.0"]
    assert differing_settings([demo, demo]) == ["", ""]


def test_fewer_samples_reuse_the_folder_and_keep_every_record(tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from kvbench.resources import CONFIG_DIR
    from kvbench.runner.run import run_config

    def cfg(n):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=["logger=none", f"paths.results={tmp_path}", "task.context_tokens=300",
                                                "method=streamingllm", "budget.tokens=32", f"task.num_samples={n}"])

    three = run_config(cfg(3))
    two = run_config(cfg(2))
    assert two.path == three.path and two.meta["samples_this_session"] == 0  # nothing recomputed
    assert two.scores["n"] == 2 and [r["id"] for r in two.records] == [r["id"] for r in three.records[:2]]
    assert len((two.path / "predictions.jsonl").read_text().splitlines()) == 3  # the third record stays
    assert json.loads((two.path / "scores.json").read_text())["n"] == 2
    assert json.loads((two.path / "meta.json").read_text())["samples_on_disk"] == 3
