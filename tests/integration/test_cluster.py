"""Scale-out: the submitit launchers (local executor; Slurm config only), tables over several results folders."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbench.report.tables import main as tables_main
from tests.helpers import fake_run

ROOT = Path(__file__).resolve().parents[2]


def readme_command(marker: str) -> list[str]:
    """The first `kvbench run ...` line of the README that contains `marker`, as arguments."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith("kvbench run") and marker in line:
            return shlex.split(line.strip())[2:]
    raise AssertionError(f"no README command with {marker}")


def kvbench_run(cwd, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kvbench", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_slurm_sweep_config_resolves_with_the_readme_command(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = readme_command("hydra/launcher=slurm")
    assert "-m" in args and any(a.startswith("run.shard=") for a in args)
    out = kvbench_run(tmp_path, *args, "--cfg", "all", "--resolve")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    launcher = cfg["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["gpus_per_node"] == 1 and launcher["max_num_timeout"] >= 1
    assert launcher["submitit_folder"].endswith("/.submitit/%j") and "${" not in launcher["submitit_folder"]
    assert cfg["run"]["num_shards"] == 4 and cfg["run"]["shard"] == 0
    assert "a sweep of 4 job(s)" in out.stderr


@pytest.mark.slow
def test_local_launcher_sweep_writes_what_the_basic_launcher_writes(tmp_path):
    """The standard sweep: the full cache at two budgets plans one run folder twice. kvbench's sweeper launches
    it once (in parallel the second job would stop on the first's lock and fail the sweep)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = ["-m", "logger=none", "task.context_tokens=300", "task.num_samples=2", "method=full,streamingllm",
             "budget.tokens=32,64"]
    tables = {}
    for launcher in ("basic", "local"):
        (tmp_path / launcher).mkdir()
        out = kvbench_run(tmp_path / launcher, *sweep, f"hydra/launcher={launcher}",
                          f"paths.results={tmp_path / launcher / 'results'}")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "method=full budget.tokens=64" in out.stderr and "launched once" in out.stderr
        runs = tmp_path / launcher / "results" / "runs"
        tables[launcher] = sorted(str(p.parent.relative_to(runs)).rsplit("-", 1)[0] for p in runs.rglob("scores.json"))
        (table,) = (tmp_path / launcher / "results" / "tables").glob("sweep-*_retrieval.md")  # named after its sweep
        tables[launcher].append(table.read_text())
    assert tables["local"] == tables["basic"]
    assert tables["local"][:3] == ["tiny/passkey/full/full", "tiny/passkey/streamingllm/tokens32",
                                   "tiny/passkey/streamingllm/tokens64"]
    assert "| streamingllm | tokens64 |" in tables["local"][3].replace("  ", " ").replace("  ", " ")
    assert list((tmp_path / "local").glob("multirun/*/*/.submitit"))  # it did go through submitit


def test_table_over_several_results_folders(tmp_path, capsys):
    fake_run(tmp_path / "a", "tiny", "passkey", "full", "full", {"passkey": 100.0})
    fake_run(tmp_path / "b", "tiny", "passkey", "h2o", "tokens64", {"passkey": 40.0}, 64)
    assert tables_main(["--results", str(tmp_path / "a"), str(tmp_path / "b"), "--name", "both"]) == 0
    table = (tmp_path / "a" / "tables" / "both_retrieval.md").read_text()
    assert re.search(r"\| tiny +\| full +\| full +\| +100\.00", table)
    assert re.search(r"\| tiny +\| h2o +\| tokens64 +\| +40\.00", table)


def test_sweeper_keeps_the_first_job_of_each_run_folder(capsys):
    from hydra_plugins.kvbench_sweeper.kvbench_sweeper import unique_jobs

    folders = {"a": ("f1", "p"), "b": ("f2", "p"), "c": ("f1", "p"), "d": None, "e": None, "f": ("f1", "q")}
    kept = unique_jobs([[k] for k in folders], lambda job: folders[job[0]])
    assert kept == [["a"], ["b"], ["d"], ["e"], ["f"]]  # an unplannable job (None) is launched; shards differ
    assert "c writes the same run folder as a (f1); launched once" in capsys.readouterr().err


def test_a_slurm_job_renames_itself_after_its_run(tmp_path, monkeypatch):
    """scontrol (a stand-in on PATH that records its arguments) is asked to name the array task after the run."""
    from kvbench.runner.slurm import name_job

    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    for var, value in {"SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "1"}.items():
        monkeypatch.setenv(var, value)
    name_job("tiny-passkey-full-full")
    assert log.read_text().split() == ["update", "JobId=100_1", "JobName=tiny-passkey-full-full"]


def test_a_slurm_request_no_node_can_meet_is_one_line(tmp_path, monkeypatch):
    """sinfo and sbatch stand-ins: a CPU partition (2 CPUs, 8 GB, no GPU) and a GPU one."""
    from kvbench.errors import KVBenchError
    from kvbench.runner.slurm import check_request

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'debug*|2|8000|(null)\\ngpu|32|512000|gpu:a100:4(S:0-1)\\n'\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
             "gpus_per_node": 1, "cpus_per_task": 8, "tasks_per_node": 1, "mem_gb": 64, "partition": None}
    cases = [({}, "partition debug has 0 GPUs per node, the sweep asks for 1: use hydra/launcher=slurm_cpu"),
             ({"gpus_per_node": 0, "cpus_per_task": 4}, "set hydra.launcher.cpus_per_task<=2"),
             ({"gpus_per_node": 0, "cpus_per_task": 1}, "set hydra.launcher.mem_gb<=7"),
             ({"partition": "big"}, "Slurm partition big not found; sinfo lists: debug, gpu"),
             ({"partition": "gpu", "gpus_per_node": 8}, "set hydra.launcher.gpus_per_node<=4")]
    for change, message in cases:
        with pytest.raises(KVBenchError, match=re.escape(message)):
            check_request({**slurm, **change})
    check_request({**slurm, "partition": "gpu"})  # fits
    check_request({**slurm, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 4})  # slurm_cpu's request fits
    check_request({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"})
