"""One run sharded over processes: same records and scores as unsharded, merge, locks, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbench.errors import KVBenchError
from kvbench.runner.folder import read_records
from kvbench.runner.lock import RunLock
from kvbench.runner.merge import main as merge_main
from kvbench.runner.run import execute, plan, resolve
from kvbench.runner.shards import Shard, interleave
from tests.integration.test_run import config, read_jsonl

ARGS = ["method=h2o", "budget.tokens=64", "task.num_samples=5"]
TIMING = {"seconds", "prefill_seconds", "wall_seconds"}


def run_folder(tmp_path, *args):
    """The folder a config runs in (model/task/method/<budget>-<run id>)."""
    return plan(resolve(config(tmp_path, *args))).path


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_shards_split_by_position_and_interleave_back():
    samples = [f"s{i}" for i in range(11)]
    parts = [Shard(i, 3).select(samples) for i in range(3)]
    assert parts[1] == ["s1", "s4", "s7", "s10"]  # samples i, i+N, i+2N, ...
    assert sorted(sum(parts, [])) == sorted(samples) and interleave(parts) == samples
    assert Shard(0, 1).predictions_name == "predictions.jsonl"
    assert Shard(2, 3).predictions_name == "predictions.2-of-3.jsonl"
    for bad in ({"shard": 3, "num_shards": 3}, {"shard": 0, "num_shards": 0}, {"shard": -1, "num_shards": 2}):
        with pytest.raises(KVBenchError, match="run.(num_)?shard"):
            Shard.from_config({"run": bad})


def test_three_shards_merge_to_the_unsharded_run(tmp_path, capsys):
    reference = execute(config(tmp_path / "one", *ARGS))
    folders = [execute(config(tmp_path / "three", *ARGS, "run.num_shards=3", f"run.shard={i}")) for i in (2, 0, 1)]
    folder = folders[0]
    assert folders == [folder] * 3 and folder.relative_to(tmp_path / "three") == reference.relative_to(tmp_path / "one")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "meta.json", "predictions.jsonl", "scores.json"]

    records, expected = read_jsonl(folder / "predictions.jsonl"), read_jsonl(reference / "predictions.jsonl")
    assert strip(records) == strip(expected)  # same samples, same order, same bytes but the timings
    assert (folder / "scores.json").read_bytes() == (reference / "scores.json").read_bytes()
    meta, ref_meta = (json.loads((f / "meta.json").read_text()) for f in (folder, reference))
    assert meta["num_shards"] == 3 and [s["shard"] for s in meta["shards"]] == [0, 1, 2]
    assert [s["samples"] for s in meta["shards"]] == [2, 2, 1] and meta["samples"] == 5
    assert meta["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in meta["shards"]), abs=0.01)
    assert meta["memory"]["peak_memory_bytes"] == max(s["memory"]["peak_memory_bytes"] for s in meta["shards"])
    assert all(s["device"]["type"] == "cpu" and s["host"] for s in meta["shards"])
    for key in ("prompt_tokens", "new_tokens"):
        assert meta["timing"][key] == ref_meta["timing"][key]
    assert meta["kv"] == ref_meta["kv"]

    # a rerun of any shard of the merged run is skipped; so is the unsharded run
    assert execute(config(tmp_path / "three", *ARGS, "run.num_shards=3", "run.shard=1")) == folder
    assert (folder / "scores.json").read_bytes() == (reference / "scores.json").read_bytes()
    assert merge_main([str(folder)]) == 2 and "merged already" in capsys.readouterr().err


def test_merge_command_names_missing_shards_then_merges_after_a_job_died(tmp_path, monkeypatch, capsys):
    first = execute(config(tmp_path, *ARGS, "run.num_shards=2", "run.shard=0"))
    assert not (first / "scores.json").exists() and (first / "meta.0-of-2.json").exists()
    assert merge_main([str(first)]) == 2
    assert "shard(s) 1 of 2 not finished" in capsys.readouterr().err
    monkeypatch.setattr("kvbench.runner.merge.merge", lambda *args, **kwargs: None)  # the last job died right there
    execute(config(tmp_path, *ARGS, "run.num_shards=2", "run.shard=1"))
    assert not (first / "scores.json").exists()
    monkeypatch.undo()
    assert merge_main([str(first)]) == 0 and "merged 5 samples" in capsys.readouterr().out
    assert json.loads((first / "scores.json").read_text())["n"] == 5
    assert not list(first.glob("*-of-2*"))


def test_rerun_of_a_finished_shard_does_the_merge_its_last_job_missed(tmp_path, monkeypatch):
    monkeypatch.setattr("kvbench.runner.merge.merge", lambda *args, **kwargs: None)
    for i in range(2):
        folder = execute(config(tmp_path, *ARGS, "run.num_shards=2", f"run.shard={i}"))
    monkeypatch.undo()
    monkeypatch.setattr("kvbench.models.load", lambda cfg: pytest.fail("a finished shard must not load the model"))
    execute(config(tmp_path, *ARGS, "run.num_shards=2", "run.shard=0"))  # e.g. the sweep submitted again
    assert json.loads((folder / "scores.json").read_text())["n"] == 5


# ----------------------------------------------------------------------------- locks (real processes)

HOLD = "import sys, time; from kvbench.runner.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_second_process_gets_the_lock_error_and_writes_nothing(tmp_path):
    first = execute(config(tmp_path, *ARGS, "task.num_samples=2"))  # a partial run: 2 of 3 samples on disk
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(first / ".lock")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KVBenchError) as err:
            execute(config(tmp_path, *ARGS, "task.num_samples=3"))
        message = str(err.value)
        assert f"pid {holder.pid}" in message and f"host {os.uname().nodename}" in message and "\n" not in message
        assert {p.name: p.read_bytes() for p in first.iterdir() if p.name != ".lock"} == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "x.lock")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert dead.stdout.readline().strip() == "held"
    dead.kill()
    dead.wait()
    folder = run_folder(tmp_path, *ARGS, "task.num_samples=2")
    folder.mkdir(parents=True)
    os.replace(tmp_path / "x.lock", folder / ".lock")  # its holder is gone
    assert execute(config(tmp_path, *ARGS, "task.num_samples=2")) == folder
    assert (folder / "scores.json").exists() and not (folder / ".lock").exists()


def test_lock_of_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": "node-a", "pid": 1, "slurm_job": "77_3", "since": "t"}))
    with pytest.raises(KVBenchError, match="host node-a pid 1, Slurm job 77_3"):
        RunLock(lock).acquire()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # requeued after preemption, maybe onto another node
    held = RunLock(lock).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


@pytest.mark.slow
def test_shard_killed_mid_way_resumes(tmp_path):
    one = "run.batch_size=1"  # one sample at a time, so the kill lands between records (batches: test_batch.py)
    args = ["logger=none", "task.context_tokens=300", *ARGS, "task.num_samples=10",
            "run.num_shards=2", "run.shard=0", f"paths.results={tmp_path}", one]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    job = subprocess.Popen([sys.executable, "-m", "kvbench", "run", *args], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = run_folder(tmp_path, *ARGS)
    shard_file = folder / "predictions.0-of-2.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        if shard_file.exists() and shard_file.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)  # preempted without warning: no clean-up at all
    job.wait()
    written = len(read_records(shard_file))  # (a line cut by the kill does not count)
    assert 1 <= written < 5, "the shard finished before it could be killed"
    assert json.loads((folder / ".lock.0-of-2").read_text())["pid"] == job.pid  # left behind

    for i in (0, 1):  # the restarted shard takes the stale lock over and resumes; shard 1 merges
        execute(config(tmp_path, *ARGS, "task.num_samples=10", "run.num_shards=2", f"run.shard={i}", one))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["shards"][0]["samples_this_session"] == 5 - written
    reference = execute(config(tmp_path / "one", *ARGS, "task.num_samples=10", one))
    assert strip(read_jsonl(folder / "predictions.jsonl")) == strip(read_jsonl(reference / "predictions.jsonl"))
    assert (folder / "scores.json").read_bytes() == (reference / "scores.json").read_bytes()
    assert not list(folder.glob(".lock*"))


def test_preempted_shard_releases_its_lock_and_its_requeued_job_resumes(tmp_path, monkeypatch):
    # submitit's handler for the preemption signal checkpoints (Hydra's launcher resubmits the same
    # job), requeues, then raises SystemExit inside the sample loop: the lock must go, the samples stay
    launcher = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    assert callable(getattr(launcher.SlurmLauncher, "checkpoint", None))
    from kvbench.tasks.synthetic import Passkey

    original, calls = Passkey.record, {"n": 0}

    def preempted_after_two(self, sample, *args):  # a sample's record, whatever the batch size
        if calls["n"] == 2:
            raise SystemExit(-1)
        calls["n"] += 1
        return original(self, sample, *args)

    args = [*ARGS, "run.num_shards=2", "run.shard=0"]
    monkeypatch.setattr(Passkey, "record", preempted_after_two)
    with pytest.raises(SystemExit):
        execute(config(tmp_path, *args))
    folder = run_folder(tmp_path, *args)
    assert len(read_jsonl(folder / "predictions.0-of-2.jsonl")) == 2 and not list(folder.glob(".lock*"))
    monkeypatch.setattr(Passkey, "record", original)
    execute(config(tmp_path, *args))  # the requeued job
    assert json.loads((folder / "meta.0-of-2.json").read_text())["samples_this_session"] == 1


def test_a_run_refused_for_other_settings_leaves_no_lock(tmp_path):
    folder = execute(config(tmp_path, *ARGS, "task.num_samples=1"))
    stored = folder / "config.yaml"  # a hand-edited config.yaml: the folder now holds other settings
    stored.write_text(stored.read_text().replace("context_tokens: 300", "context_tokens: 320"))
    with pytest.raises(KVBenchError, match="context_tokens"):
        execute(config(tmp_path, *ARGS, "task.num_samples=2"))
    assert not list(folder.glob(".lock*"))


def test_an_error_before_the_sample_loop_releases_the_lock(tmp_path, monkeypatch):
    # the Python API's process lives on after an error: a lock left behind would refuse its next call
    import kvbench.runner.run

    def broken(*args, **kwargs):
        raise RuntimeError("generator failed")

    finished = []
    monkeypatch.setattr(kvbench.runner.run, "Generator", broken)
    monkeypatch.setattr(kvbench.runner.run.Tracker, "finish", lambda self, exit_code=0: finished.append(exit_code))
    with pytest.raises(RuntimeError, match="generator failed"):
        execute(config(tmp_path, *ARGS, "task.num_samples=1"))
    folder = run_folder(tmp_path, *ARGS, "task.num_samples=1")
    assert not list(folder.glob(".lock*"))
    assert finished == [1]  # the tracker (W&B) was started: its run is marked failed, not left open
    monkeypatch.undo()
    assert (execute(config(tmp_path, *ARGS, "task.num_samples=1")) / "scores.json").exists()  # same process, again
