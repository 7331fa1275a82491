"""Run folders: `results/runs/<model>/<task>/<method>/<budget>-<run id>/` (`kvbench/identity.py`).

Each holds
- `predictions.jsonl`: one record per sample, appended and flushed as it goes;
- `config.yaml`: the resolved config of the run, with its `run_id` and the settings hashed into it;
- `scores.json`: scores per sub-task and their average;
- `meta.json`: git commit, versions, device, seed, timings, memory, KV kept.

A restarted run with the same settings skips the samples already on disk; a
half-written last line (a kill mid-write) is dropped, and so is a corrupt line
anywhere else (with a warning that counts them), every other record is kept. A full disk ends the run
with one line naming the folder; a record that could not be written whole is cut back, not left torn.
A folder that holds a run with other settings is never mixed into: that is an
error naming the fix. Every file is written with the permissions the umask
gives (0644 by default); summary files atomically (temp file + rename).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import yaml

from kvbench.errors import KVBenchError
from kvbench.runner.identity import hashed_settings

log = logging.getLogger("kvbench")


def safe_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-") or "x"


def run_path(root: str | Path, model: str, task: str, method: str, budget: str, run_id: str | None = None) -> Path:
    last = f"{safe_label(budget)}-{run_id}" if run_id else safe_label(budget)
    return Path(root) / "runs" / safe_label(model) / safe_label(task) / safe_label(method) / last


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new)):
            lines += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return lines
    return [] if old == new else [f"{prefix.rstrip('.')}: {old} -> {new}"]


def file_mode() -> int:
    """The permissions a new file gets under the current umask (0644 with the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(err: OSError, folder: Path) -> KVBenchError | None:
    """The one line a full disk (or quota) gets while writing under `folder`; None for any other error."""
    if err.errno not in DISK_FULL:
        return None
    return KVBenchError(f"no space left on the disk holding {folder} ({err.strerror}): free space there (or set "
                        "paths.results to another disk) and rerun the same command; what is on disk is kept "
                        "and the run resumes from it")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (temp file + rename); a full disk is one KVBenchError line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: 0600
    except OSError as err:
        raise disk_full(err, path.parent) or err from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_full(err, path.parent) if isinstance(err, OSError) else None
        if full:
            raise full from err
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The records of a predictions file. A corrupt line is dropped alone (its sample runs again) and
    every other record kept: a trailing partial line (killed mid-write) is silently cut, a corrupt line
    elsewhere is counted in a warning. `repair` rewrites the file atomically without the dropped lines."""
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    records, good, bad = [], [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and "id" in record:
            records.append(record)
            good.append(line)
        elif line.strip() and not (number == len(lines) and not line.endswith(b"\n")):
            bad.append(number)
    if bad:
        log.warning("%s: dropped %d corrupt line(s) (line %s); their samples run again",
                    path, len(bad), ", ".join(map(str, bad[:10])))
    if repair and len(good) != len(lines):
        atomic_write_text(path, b"".join(good).decode())
    return records


class RunFolder:
    def __init__(self, path: Path, predictions_name: str = "predictions.jsonl"):
        self.path = Path(path)
        self.predictions_name = predictions_name  # a shard's own file (kvbench.runner.shards)

    @property
    def predictions_path(self) -> Path:
        return self.path / self.predictions_name

    def open(self, resolved_cfg: dict) -> None:
        """Create the folder, or check that the run already in it has the same settings."""
        config_path = self.path / "config.yaml"
        if config_path.exists():
            changes = self._changes(resolved_cfg)
            if changes:
                raise KVBenchError(
                    f"{self.path} holds a run with other settings ({'; '.join(changes[:4])}); "
                    "its config.yaml was changed by hand or by another kvbench version; move or delete that folder"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, yaml.safe_dump(resolved_cfg, sort_keys=False))

    def finished(self, resolved_cfg: dict) -> bool:
        """True when this folder holds a finished run of exactly these settings (same sample count too)."""
        if not (self.path / "scores.json").exists() or not (self.path / "config.yaml").exists():
            return False
        old = self._old_config()
        counts = [(c.get("task") or {}).get(k) for c in (old, resolved_cfg) for k in ("limit", "num_samples")]
        return not self._changes(resolved_cfg) and counts[:2] == counts[2:]

    def _old_config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text()) or {}

    def _changes(self, resolved_cfg: dict) -> list[str]:
        """Settings of the run on disk that differ from `resolved_cfg` (its config.yaml must exist)."""
        return _diff(hashed_settings(self._old_config()), hashed_settings(resolved_cfg))

    def records(self) -> list[dict]:
        """Records on disk (a corrupt line dropped and counted, the file repaired: `read_records`)."""
        return read_records(self.predictions_path, repair=True)

    def append(self, record: dict) -> None:
        """Append one record as one line, flushed to disk; a write that fails (a full disk) is cut back so
        no torn line stays behind, and a full disk is one KVBenchError line naming the folder."""
        line = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        with open(self.predictions_path, "ab", buffering=0) as f:
            end = f.tell()
            try:
                while line:  # a nearly full disk may take part of a write
                    line = line[f.write(line):]
                os.fsync(f.fileno())
            except OSError as err:
                f.truncate(end)
                raise disk_full(err, self.path) or err from err

    def write_scores(self, scores: dict) -> None:
        atomic_write_json(self.path / "scores.json", scores)

    def write_meta(self, meta: dict) -> None:
        atomic_write_json(self.path / "meta.json", meta)
