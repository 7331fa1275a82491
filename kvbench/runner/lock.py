"""A lock file per run folder (or per shard of it): two processes never append to the same predictions.

The lock is created with O_CREAT|O_EXCL and holds the holder's host, pid, Slurm job and start time.
A second process gets a one-line `KVBenchError` naming the holder. A lock is stale, and taken over,
when its pid is dead (or is this process) on this host, or when it was left by an earlier run of this same Slurm job
(a preempted job that submitit requeued, possibly onto another node). Released on exit.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from kvbench.errors import KVBenchError


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": _slurm_job(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder(path: Path) -> dict | None:
    """Who holds the lock at `path` (None when free); a lock that cannot be read counts as held."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # being written right now, or a crash between create and write
        age = time.time() - Path(path).stat().st_mtime if Path(path).exists() else 0
        return {"host": "?", "pid": -1, "since": "?", "unreadable": True, "age": age}


def _same(info: dict | None) -> dict | None:
    return {k: v for k, v in info.items() if k != "age"} if info else info


def is_stale(info: dict) -> bool:
    me = _me()
    if info.get("unreadable"):
        return info.get("age", 0) > 60
    if info.get("host") == me["host"]:
        pid = int(info.get("pid", -1))
        return pid == me["pid"] or not _alive(pid)  # its own pid: left by an earlier run in this process
    # on another node: stale only when left by an earlier run of this job (requeued after preemption)
    return bool(info.get("slurm_job")) and info.get("slurm_job") == me["slurm_job"]


def describe(info: dict) -> str:
    job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
    return f"host {info.get('host')} pid {info.get('pid')}{job} since {info.get('since')}"


def check_free(path: Path) -> None:
    """Raise the lock error if a live process holds `path` (writes nothing): a cheap early check."""
    info = holder(path)
    if info is not None and not is_stale(info):
        raise KVBenchError(
            f"{Path(path).parent} is being written by {describe(info)} ({Path(path).name}); "
            f"wait for it, or delete {path} if that process is gone"
        )


class RunLock:
    """`with RunLock(folder / ".lock"):` holds the lock for the block (the folder must exist)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.held = False

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                stale = holder(self.path)
                check_free(self.path)  # raises unless the holder is gone
                self._remove_stale(stale)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(_me()) + "\n")
            self.held = True
            return self
        check_free(self.path)
        raise KVBenchError(f"could not take the lock {self.path}; delete it if no kvbench process uses that folder")

    def _remove_stale(self, stale: dict | None) -> None:
        # Moved aside, then checked: when another process took the stale lock over in between, the
        # lock moved aside is its fresh one, and goes back (os.link refuses to overwrite).
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if _same(holder(aside)) != _same(stale):
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            info = holder(self.path)
            if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
