"""Weights & Biases logging: offline by default (sync later with `wandb sync`), online, or disabled.

One W&B run per kvbench run, named `<model>/<task>/<method>/<budget>`, grouped by
experiment or sweep. Keys are stable so a dashboard can group by method and plot
budget against score:
- config: the resolved config plus `method_name`, `budget_label`, `budget_tokens`, `budget_ratio`,
  `model_name`, `task_name`;
- summary/metrics: `score/<subtask>`, `score/avg`, `kv/ratio`, `kv/kept_bytes`, `kv/full_bytes`,
  `time/tokens_per_s`, `time/wall_s`, `memory/peak_bytes`;
- a `predictions` table (id, prediction, answers, score).

The W&B run id is kept in the run folder (`wandb.json`), so a resumed run
continues the same W&B run (`resume="allow"`); a run that stops on an
exception or a kill signal is finished with exit code 1 (W&B shows it failed,
not finished and empty).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from kvbench.runner.folder import disk_full

MODES = ("offline", "online", "disabled")
# what python -m kvbench.report.dashboard builds its panels from: group by method, budget (x) against score (y)
DASHBOARD_CONFIG = ("method_name", "budget_tokens", "budget_ratio", "budget_label", "model_name", "task_name",
                    "experiment_name")
DASHBOARD_METRICS = ("score/avg", "kv/ratio", "time/tokens_per_s", "memory/peak_bytes")


def dashboard_keys(scores: dict, meta: dict) -> dict:
    out = {f"score/{task}": value for task, value in scores.get("scores", {}).items()}
    out["score/avg"] = scores.get("average")
    kv = meta.get("kv", {})
    out["kv/ratio"] = kv.get("kv_ratio")
    out["kv/kept_bytes"] = kv.get("kv_kept_bytes")
    out["kv/full_bytes"] = kv.get("kv_full_bytes")
    out["time/tokens_per_s"] = meta.get("timing", {}).get("tokens_per_s")
    out["time/wall_s"] = meta.get("wall_seconds")
    out["memory/peak_bytes"] = meta.get("memory", {}).get("peak_memory_bytes")
    out["samples"] = scores.get("n")
    return {k: v for k, v in out.items() if v is not None}


class Tracker:
    """A thin wrapper so the runner never checks whether W&B is on."""

    def __init__(self, logger_cfg: dict | None, name: str, group: str, config: dict, tags: list[str],
                 run_folder: Path | None = None):
        self.run = None
        cfg = dict(logger_cfg or {})
        if cfg.get("name", "none") != "wandb":
            return
        mode = os.environ.get("WANDB_MODE") or cfg.get("mode", "offline")
        if mode not in MODES:
            from kvbench.errors import KVBenchError

            raise KVBenchError(f"logger.mode={mode} is not one of: {', '.join(MODES)}")
        if mode == "disabled":
            return
        import wandb

        directory = Path(cfg.get("dir") or "results")
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.get("project", "kvbench"),
            entity=cfg.get("entity"),
            name=name,
            group=group,
            job_type=config.get("task_name"),
            tags=tags,
            config=config,
            dir=str(directory),
            mode=mode,
            id=_run_id(run_folder),
            resume="allow",
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_results(self, scores: dict, meta: dict, records: list[dict]) -> None:
        if self.run is None:
            return
        try:
            self._log_results(scores, meta, records)
        except OSError as err:  # a full disk under W&B's offline folder: one line naming it
            raise disk_full(err, Path(self.run.dir)) or err from err

    def _log_results(self, scores: dict, meta: dict, records: list[dict]) -> None:
        import wandb

        keys = dashboard_keys(scores, meta)
        self.run.log(keys)
        self.run.summary.update(keys)
        layer_head = meta.get("kv", {}).get("kv_kept_fraction_per_layer_head")
        if layer_head:
            self.run.summary["kv/kept_fraction_per_layer_head"] = layer_head
        table = wandb.Table(columns=["id", "prediction", "answers", "score"])  # score of a sample: 0..1
        for record in records:
            table.add_data(record.get("id"), record.get("prediction"), str(record.get("answers")), record.get("score"))
        self.run.log({"predictions": table})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish(exit_code=exit_code)
            except OSError as err:
                raise disk_full(err, Path(run.dir)) or err from err


def _run_id(run_folder: Path | None) -> str | None:
    """The W&B run id kept in `<run folder>/wandb.json`, made (and kept) on the first session."""
    if run_folder is None:
        return None
    from kvbench.runner.folder import atomic_write_text

    path = Path(run_folder) / "wandb.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["id"]
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: a new W&B run
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, json.dumps({"id": run_id}) + "\n")
    return run_id
