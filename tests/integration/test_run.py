"""The runner: resume, settings checks, bad input, and the command line through Hydra."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench.errors import KVBenchError
from kvbench.resources import CONFIG_DIR
from kvbench.runner.main import check_overrides
from kvbench.runner.run import execute
from kvbench.tasks.synthetic import Passkey

SMALL = ["task.context_tokens=300"]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["logger=none", f"paths.results={tmp_path}", *SMALL, *overrides])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_folder(root, model, task, method, budget):
    """The one run folder `<root>/runs/<model>/<task>/<method>/<budget>-<run id>`."""
    (folder,) = (Path(root) / "runs" / model / task / method).glob(f"{budget}-*")
    return folder


TIMING = ("seconds", "prefill_seconds", "wall_seconds")


def test_killed_run_resumes_without_duplicates_and_same_scores(tmp_path, monkeypatch):
    args = ["method=streamingllm", "budget.tokens=48", "task.num_samples=8"]
    reference = execute(config(tmp_path / "a", *args))

    calls = {"n": 0}
    original = Passkey.record

    def dies_after_five(self, sample, *args):  # a sample's record, whatever the batch size
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C, or the job was killed
        calls["n"] += 1
        return original(self, sample, *args)

    monkeypatch.setattr(Passkey, "record", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        execute(config(tmp_path / "b", *args))
    folder = run_folder(tmp_path / "b", "tiny", "passkey", "streamingllm", "tokens48")
    assert len(read_jsonl(folder / "predictions.jsonl")) == 5
    assert not (folder / "scores.json").exists()
    with open(folder / "predictions.jsonl", "a") as f:
        f.write('{"id": "passkey-5", "predic')  # killed in the middle of a write

    monkeypatch.setattr(Passkey, "record", original)
    resumed = execute(config(tmp_path / "b", *args))
    records = read_jsonl(resumed / "predictions.jsonl")
    assert sorted(r["id"] for r in records) == [f"passkey-{i}" for i in range(8)]  # in the order they finished
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    by_id = lambda rs: sorted(rs, key=lambda r: r["id"])  # noqa: E731
    assert strip(by_id(records)) == strip(by_id(read_jsonl(reference / "predictions.jsonl")))
    assert json.loads((resumed / "scores.json").read_text()) == json.loads((reference / "scores.json").read_text())
    meta = json.loads((resumed / "meta.json").read_text())
    assert meta["samples"] == 8 and meta["samples_this_session"] == 3
    # timing sums every session's records: 5 from the killed session, 3 from this one
    assert meta["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in records), abs=2e-3)
    timing = meta["timing"]
    assert timing["generation_seconds"] == pytest.approx(sum(r["seconds"] for r in records), abs=2e-3)
    assert timing["prefill_seconds"] + timing["decode_seconds"] == pytest.approx(timing["generation_seconds"], abs=2e-3)
    assert timing["new_tokens_per_s"] == pytest.approx(timing["new_tokens"] / timing["decode_seconds"], rel=1e-2)


def test_run_folder_files_and_meta(tmp_path, monkeypatch):
    import socket

    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
             "SLURM_RESTART_COUNT": "1", "SLURM_JOB_NAME": "tiny-passkey-streamingllm-tokens32"}
    for var, value in slurm.items():  # as Slurm sets them in the second segment of a requeued array task
        monkeypatch.setenv(var, value)
    folder = execute(config(tmp_path, "method=streamingllm", "budget.tokens=32", "task.num_samples=3"))
    assert folder == run_folder(tmp_path, "tiny", "passkey", "streamingllm", "tokens32")
    assert {p.name for p in folder.iterdir()} == {"predictions.jsonl", "scores.json", "config.yaml", "meta.json"}
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("git", "versions", "device", "seed", "wall_seconds", "timing", "memory", "kv"):
        assert key in meta
    assert meta["versions"]["transformers"].startswith("5.")
    assert meta["memory"]["peak_memory_bytes"] > 0
    assert 0 < meta["kv"]["kv_ratio"] < 1
    records = read_jsonl(folder / "predictions.jsonl")
    expected = sum(32 / r["n_prompt"] for r in records) / len(records)
    grid = meta["kv"]["kv_kept_fraction_per_layer_head"]  # StreamingLLM keeps 32 of the prompt in every head
    assert all(cell == pytest.approx(expected, abs=1e-4) for row in grid for cell in row)
    assert meta["command"].startswith("kvbench run")
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["n"] == 3 and set(scores["scores"]) == {"passkey"}
    assert meta["host"] == socket.gethostname()
    assert {k: meta["slurm"][k] for k in ("job_id", "array_job_id", "array_task_id", "restart_count", "job_name")} == {
        "job_id": "4242", "array_job_id": "4240", "array_task_id": "2", "restart_count": 1,
        "job_name": "tiny-passkey-streamingllm-tokens32"}


def test_other_settings_get_their_own_folder_and_a_tag_stays_readable(tmp_path):
    first = execute(config(tmp_path, "task.num_samples=2"))
    other = execute(config(tmp_path, "task.num_samples=2", "task.context_tokens=320"))
    assert other.parent == first.parent and other.name != first.name  # full/full-<hash> twice
    tagged = execute(config(tmp_path, "task.num_samples=2", "task.context_tokens=320", "run.tag=ctx320"))
    assert tagged.parent.name == "full-ctx320" and tagged.name == other.name  # the tag is not hashed
    # more samples of the same settings extend the run instead
    assert execute(config(tmp_path, "task.num_samples=3")) == first
    # a folder whose config.yaml says other settings (edited by hand, an older kvbench) is never mixed into
    stored = (first / "config.yaml").read_text()
    (first / "config.yaml").write_text(stored.replace("context_tokens: 300", "context_tokens: 310"))
    (first / "scores.json").unlink()
    with pytest.raises(KVBenchError, match="holds a run with other settings"):
        execute(config(tmp_path, "task.num_samples=3"))


def test_bad_budget_writes_nothing(tmp_path):
    with pytest.raises(KVBenchError, match="budget.tokens=0"):
        execute(config(tmp_path, "method=streamingllm", "budget.tokens=0"))
    assert not (tmp_path / "runs").exists()


def test_override_precheck_names_valid_choices():
    assert check_overrides(["method=full,streamingllm", "budget.tokens=32,64"]) is None
    assert check_overrides(["method=h2oo"]) == (
        "unknown method 'h2oo'; choose one of: ada_snapkv, cake, critical_adakv_expected_attention, "
        "critical_expected_attention, critical_snapkv, duo_attention, expected_attention, full, h2o, h2o-sink4, headkv, "
        "keydiff, kivi, knorm, kvzip, lagkv, pyramidkv, qfilter, random, scissorhands, simlayerkv, snapkv, snapkv-agnostic, "
        "streamingllm, tova, vatp, vatp-scissorhands, weightedkv"
    )
    assert "choose one of" in check_overrides(["model=llama3"])
    assert "choose one of" in check_overrides(["task=longbenc"])
    assert check_overrides(["budget.tokens=0"]) == "budget.tokens=0: a budget must be a number > 0"
    assert check_overrides(["budget.ratio=-0.5"]) is not None
    assert check_overrides(["experiment=null", "task.limit=3"]) is None


# ----------------------------------------------------------------------------- command line (subprocess)


def cli(tmp_path, *args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvbench", "run", *args, f"paths.results={tmp_path / 'results'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def wandb_runs(tmp_path):
    return sorted((tmp_path / "results" / "wandb").glob("offline-run-*/*.wandb"))


@pytest.mark.slow
def test_cli_multirun_budget_sweep(tmp_path):
    out = cli(tmp_path, "-m", "model=tiny", "method=full,streamingllm", "budget.tokens=32,64", "task.num_samples=3")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = tmp_path / "results" / "runs" / "tiny" / "passkey"
    assert sorted(str(p.relative_to(runs)).split("-")[0] for p in runs.glob("*/*")) == [
        "full/full", "streamingllm/tokens32", "streamingllm/tokens64"
    ]
    (table_path,) = (tmp_path / "results" / "tables").glob("sweep-*_retrieval.md")  # named after its sweep
    table = table_path.read_text()
    assert "streamingllm" in table and "tokens64" in table and "Avg" not in table  # one column: nothing to average
    assert len(wandb_runs(tmp_path)) == 3  # one offline W&B run per run; full's second job finds it finished


@pytest.mark.slow
def test_cli_demo_experiment(tmp_path):
    # the demo experiment, its sweep narrowed to three methods on one task to keep the suite short
    out = cli(tmp_path, "-m", "experiment=demo", "task.num_samples=3", "task.context_tokens=400",
              "task=passkey", "method=full,streamingllm,h2o")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "results" / "tables" / "demo_retrieval.md").read_text().splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == ["model", "method", "budget", "passkey", "n"]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["full", "h2o", "h2o", "streamingllm", "streamingllm"]
    runs = wandb_runs(tmp_path)
    assert len(runs) == 5  # one offline W&B run per run (full's second budget job is skipped as finished)
    data = runs[-1].read_bytes()
    for key in (b"score/passkey", b"score/avg", b"kv/ratio", b"time/tokens_per_s", b"method_name", b"demo"):
        assert key in data, key


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["method=h2oo"], "unknown method 'h2oo'; choose one of: ada_snapkv, cake, critical_adakv_expected_attention"),
        (["model=gpt5"], "unknown model 'gpt5'; choose one of:"),
        (["method=streamingllm", "budget.tokens=0"], "a budget must be a number > 0"),
        (["model=llama2-7b-chat", "logger=none"], "hf download meta-llama/Llama-2-7b-chat-hf"),
        (["task=ppl_synthetic", "method=snapkv"], "perplexity compresses after every token, which snapkv cannot"),
        (["task.context_tokens=4096"], "beyond the model's 2048 positions"),
        (["model=tiny-random", "+model.tiny.family=deepseek_v3"], "deepseek_v3 uses multi-head latent attention"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, args, message):
    out = cli(tmp_path, *args, env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("kvbench: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "results" / "runs").exists()


def test_finished_run_is_skipped_without_loading_the_model(tmp_path, monkeypatch):
    args = ["method=streamingllm", "budget.tokens=32", "task.num_samples=2"]
    folder = execute(config(tmp_path, *args))
    scores = (folder / "scores.json").read_text()

    def no_load(cfg):
        raise AssertionError("a finished run must not load the model again")

    monkeypatch.setattr("kvbench.models.load", no_load)
    assert execute(config(tmp_path, *args)) == folder
    assert (folder / "scores.json").read_text() == scores
    with pytest.raises(AssertionError, match="must not load"):  # more samples: not finished, resumes
        execute(config(tmp_path, "method=streamingllm", "budget.tokens=32", "task.num_samples=3"))
