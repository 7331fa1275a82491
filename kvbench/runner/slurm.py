"""What a run knows of the Slurm job it runs in: meta.json's provenance, and the job's name in squeue."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

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
