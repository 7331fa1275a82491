"""kvbench on a real Slurm (issue 22): a single-node cluster from scripts/slurm_single_node.sh, which `.ci/run`
starts before `make test` where it can. Marked `slurm`; skipped where `sinfo` is absent or no node is up."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.test_cluster import kvbench_run


def slurm_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.split())


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not slurm_up(), reason="no Slurm here (scripts/slurm_single_node.sh starts one)")]
SMALL = ["logger=none", "task.num_samples=4", "task.context_tokens=300"]


def metas(results):
    return {p.parent.parent.name + "/" + p.parent.name.rsplit("-", 1)[0]: json.loads(p.read_text())
            for p in (results / "runs").rglob("meta.json")}


def test_the_standard_sweep_on_slurm_cpu_finishes_with_its_table(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    results = tmp_path / "results"
    out = kvbench_run(tmp_path, "-m", "hydra/launcher=slurm_cpu", "method=full,streamingllm", "budget.tokens=32,64",
                      *SMALL, f"paths.results={results}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "launched once" in out.stderr  # the full cache at two budgets: one job
    (table,) = (results / "tables").glob("sweep-*_retrieval.md")
    assert all(row in table.read_text() for row in ("| full ", "| tokens32 ", "| tokens64 "))
    found = metas(results)
    assert sorted(found) == ["full/full", "streamingllm/tokens32", "streamingllm/tokens64"]
    for meta in found.values():  # provenance: the array task that wrote it
        assert meta["slurm"]["job_id"] and meta["slurm"]["array_task_id"] is not None
        assert meta["slurm"]["restart_count"] == 0 and meta["host"]
    jobs = {line.split()[0] for line in subprocess.run(["sacct", "-n", "-X", "-o", "JobName%60"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()}
    assert "tiny-passkey-streamingllm-tokens64" in jobs  # each job renamed itself after its run
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    from kvbench.runner.status import main as status

    assert status([str(sweep)]) == 0


def test_a_sharded_run_as_an_array_merges_into_the_unsharded_scores(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = ["method=streamingllm", "budget.tokens=32", *SMALL]
    one = kvbench_run(tmp_path, *args, f"paths.results={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    out = kvbench_run(tmp_path, "-m", "hydra/launcher=slurm_cpu", *args, "run.num_shards=2", "run.shard=0,1",
                      f"paths.results={tmp_path / 'sharded'}")
    assert out.returncode == 0, out.stderr[-3000:]
    (a,) = (tmp_path / "one" / "runs").rglob("scores.json")
    (b,) = (tmp_path / "sharded" / "runs").rglob("scores.json")
    assert a.read_text() == b.read_text()
    (meta,) = metas(tmp_path / "sharded").values()
    assert {shard["slurm"]["array_task_id"] for shard in meta["shards"]} == {"0", "1"}


def test_a_requeued_job_resumes_with_nothing_lost_or_doubled(tmp_path):
    """USR2 in the middle of a run (what Slurm sends `signal_delay_s` before a time limit, and what submitit
    requeues on): the job starts again (StartTime=now skips Slurm's requeue delay), resumes from the samples on
    disk, and every sample is written once."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    results = tmp_path / "results"
    env_args = ["method=full", "logger=none", "task.num_samples=200", "task.context_tokens=1000",
                f"paths.results={results}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    submit = subprocess.Popen([sys.executable, "-m", "kvbench", "run", "-m", "hydra/launcher=slurm_cpu", *env_args],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    predictions = None
    deadline = time.time() + 300
    while time.time() < deadline and predictions is None:
        found = list(results.rglob("predictions.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 5:
            predictions = found[0]
        time.sleep(0.5)
    assert predictions is not None, "the job wrote no samples"
    job = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i", "-n", "tiny-passkey-full-full"], capture_output=True,
                         text=True).stdout.split()
    assert job, "the running job was not found by its name"
    # Slurm's warning before a time limit or a preemption: submitit checkpoints and requeues the job
    subprocess.run(["scancel", "--signal=USR2", job[0]], check=True)
    for _ in range(120):  # the requeued job waits out Slurm's requeue delay; start it now
        state = subprocess.run(["squeue", "-h", "-j", job[0], "-o", "%T"], capture_output=True, text=True).stdout
        if "PENDING" in state:
            subprocess.run(["scontrol", "update", f"JobId={job[0]}", "StartTime=now"], capture_output=True)
            break
        time.sleep(0.5)
    output, _ = submit.communicate(timeout=600)
    assert submit.returncode == 0, output[-3000:]
    ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
    assert len(ids) == 200 and len(set(ids)) == 200
    (meta,) = metas(results).values()
    assert meta["slurm"]["restart_count"] >= 1 and meta["samples_this_session"] < 200


def test_the_gpu_preset_on_a_node_without_gpus_is_one_line_and_submits_nothing(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    out = kvbench_run(tmp_path, "-m", "hydra/launcher=slurm", "method=full", *SMALL, f"paths.results={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("kvbench: error:")]
    assert len(errors) == 1 and "use hydra/launcher=slurm_cpu" in errors[0]
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
