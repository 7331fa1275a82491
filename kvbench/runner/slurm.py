"""What a run knows of the Slurm job it runs in: meta.json's provenance, and the job's name in squeue."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

from kvbench.errors import KVBenchError

SLURM_FIELDS = {  # meta.json key: environment variable Slurm sets in a job
    "job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT", "job_name": "SLURM_JOB_NAME", "partition": "SLURM_JOB_PARTITION",
    "node": "SLURMD_NODENAME",
}


def where_run() -> dict:
    """The host, and inside a Slurm job its job id, array task, requeue count (0 before any), name, partition
    and node; `slurm` is None outside Slurm."""
    slurm = {key: os.environ.get(var) for key, var in SLURM_FIELDS.items()} if "SLURM_JOB_ID" in os.environ else None
    if slurm is not None:
        slurm["restart_count"] = int(slurm["restart_count"] or 0)
    return {"host": socket.gethostname(), "slurm": slurm}


def name_job(name: str) -> None:
    """Inside a Slurm job, rename it after its run (squeue then says model-task-method-budget, not the array's
    name); best effort: without scontrol, or refused, the job keeps its name."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("scontrol") is None:
        return
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{array}_{task}" if array and task else job
    try:
        subprocess.run(["scontrol", "update", f"JobId={target}", f"JobName={name}"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


def partitions() -> dict[str, dict]:
    """{partition: the most CPUs, memory (MB) and GPUs one of its nodes has, and whether it is the default}."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, timeout=60)
    found: dict[str, dict] = {}
    for line in out.stdout.splitlines():
        name, cpus, mem, gres = (line.split("|") + ["", "", ""])[:4]
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))  # gpu:4, gpu:a100:4(S:0-1)
        entry = found.setdefault(name.rstrip("*"), {"cpus": 0, "mem_mb": 0, "gpus": 0, "default": name.endswith("*")})
        entry["cpus"] = max(entry["cpus"], int(cpus.rstrip("+") or 0))
        entry["mem_mb"] = max(entry["mem_mb"], int(mem.rstrip("+") or 0))
        entry["gpus"] = max(entry["gpus"], gpus)
    return found


def check_request(launcher: dict) -> None:
    """Raise KVBenchError (one line naming the setting) when a Slurm launcher asks for what no node of its
    partition has: GPUs on a CPU partition, more CPUs or memory than a node holds, an unknown partition."""
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise KVBenchError("hydra/launcher=slurm needs Slurm's commands (sinfo, sbatch) here: submit from a login "
                           "node, or use hydra/launcher=local")
    found = partitions()
    wanted = launcher.get("partition")
    name = wanted or next((p for p, entry in found.items() if entry["default"]), None)
    if name not in found:
        raise KVBenchError(f"Slurm partition {wanted or '(default)'} not found; sinfo lists: {', '.join(found) or 'none'}"
                           " (set hydra.launcher.partition=NAME)")
    node = found[name]
    gpus, cpus = launcher.get("gpus_per_node") or 0, (launcher.get("cpus_per_task") or 1) * (launcher.get("tasks_per_node") or 1)
    mem_mb = int((launcher.get("mem_gb") or 0) * 1024)
    if gpus > node["gpus"]:
        fix = "use hydra/launcher=slurm_cpu" if not node["gpus"] else f"set hydra.launcher.gpus_per_node<={node['gpus']}"
        raise KVBenchError(f"partition {name} has {node['gpus']} GPUs per node, the sweep asks for {gpus}: {fix}")
    if cpus > node["cpus"]:
        raise KVBenchError(f"partition {name} has {node['cpus']} CPUs per node, the sweep asks for {cpus}: "
                           f"set hydra.launcher.cpus_per_task<={node['cpus']}")
    if mem_mb > node["mem_mb"]:
        raise KVBenchError(f"partition {name} has {node['mem_mb']} MB per node, the sweep asks for {mem_mb}: "
                           f"set hydra.launcher.mem_gb<={node['mem_mb'] // 1024}")
