"""One run, in four named steps: plan -> resume -> loop -> finish.

- `plan(resolved)`: what the config runs (method, budget, task, labels, run folder, shard), nothing loaded;
- `resume(plan, samples)`: the records already on disk and the samples still to do;
- `loop(...)`: evaluate the remaining samples, appending each record as it finishes;
- `finish(...)`: meta.json and scores.json (or, for a shard, its meta and the merge when it is the last).

`run_config(cfg)` chains them with the model loading, the lock and W&B around them; `execute(cfg)` is the same,
returning the run folder. `kvbench.runner.main` is the command line.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kvbench import methods, models, tasks
from kvbench.engine import Budget
from kvbench.engine.batch import batch_plan
from kvbench.errors import KVBenchError
from kvbench.models.generator import Generator
from kvbench.runner import preflight
from kvbench.runner.folder import RunFolder, read_records, run_path
from kvbench.runner.identity import hashed_settings, run_id
from kvbench.runner.lock import RunLock, check_free
from kvbench.runner.merge import finish_shard, shard_done
from kvbench.runner.provenance import (
    device_info,
    git_commit,
    kv_meta,
    package_versions,
    peak_memory,
    session_wall,
    timing_meta,
)
from kvbench.runner.scoring import summarize
from kvbench.runner.shards import Shard
from kvbench.runner.slurm import name_job, where_run
from kvbench.runner.tracking import Tracker

log = logging.getLogger("kvbench")


@dataclass
class RunResult:
    """What a run leaves: its folder, scores.json's content, meta.json's, and the records of its samples."""

    path: Path | None
    scores: dict
    meta: dict = field(repr=False)
    records: list[dict] = field(repr=False)


@dataclass
class Plan:
    """What one resolved config runs, known before anything is loaded."""

    resolved: dict
    method: methods.Method
    budget: Budget | None
    task: object
    labels: dict  # model / task / method / budget: the run folder's path and the tables' index
    path: Path
    run_id: str
    shard: Shard
    batch_size: int | str = 1  # run.batch_size: sequences decoded together, or "auto"

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.path, self.shard.predictions_name)

    @property
    def name(self) -> str:
        return "/".join(self.labels.values()) + self.shard.label

    @property
    def stored(self) -> dict:
        """The config as config.yaml keeps it: resolved, with the run id and the settings hashed into it."""
        return {**self.resolved, "run_id": self.run_id, "run_settings": hashed_settings(self.resolved)}


def run_labels(cfg: dict, task, method, budget: Budget | None) -> dict:
    tag = (cfg.get("run") or {}).get("tag")
    return {
        "model": cfg["model"]["name"],
        "task": getattr(task, "label", task.name),
        "method": f"{method.run_label}-{tag}" if tag else method.run_label,
        "budget": budget.label if budget is not None else "full",
    }


def resolve(cfg: DictConfig | dict) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    resolved["model"] = models.resolve_config(resolved["model"])
    return resolved


def plan(resolved: dict) -> Plan:
    """What a resolved config runs, without loading anything."""
    method = methods.build(resolved["method"])
    budget = Budget.from_config(resolved.get("budget") or {}) if method.compresses else None
    if budget is not None and budget.tokens is None and budget.ratio is None:
        raise KVBenchError(f"method '{method.name}' needs a budget: budget.tokens=N, or budget=ratio budget.ratio=R")
    task = tasks.build(resolved["task"])
    labels = run_labels(resolved, task, method, budget)
    identity = run_id(resolved)
    path = run_path(resolved["paths"]["results"], **labels, run_id=identity)
    return Plan(resolved, method, budget, task, labels, path, identity, Shard.from_config(resolved),
                _batch_setting((resolved.get("run") or {}).get("batch_size", 1)))


def resume(p: Plan, folder: RunFolder, samples: list[dict]) -> tuple[dict, list[dict]]:
    """({id: record} already on disk, the samples still to evaluate). A shard also reuses records of the
    unsharded run in the same folder."""
    done = {r["id"]: r for r in read_records(folder.path / "predictions.jsonl")} if p.shard.sharded else {}
    done.update({r["id"]: r for r in folder.records()})
    todo = [s for s in samples if s["id"] not in done]
    if len(samples) > len(todo):
        log.info("%s: %d of %d samples already on disk, resuming", p.name, len(samples) - len(todo), len(samples))
    return done, todo


def loop(p: Plan, folder: RunFolder, generator: Generator, todo: list[dict], done: dict, total: int) -> None:
    """Evaluate `todo`, appending each record to the run folder as it finishes: a task that prepares prompts
    (`prepare` / `record`) is decoded `run.batch_size` sequences at a time, perplexity in its own document
    batches (`task.batch_size`), anything else one sample at a time. The records that finish together share
    the wall time since the previous ones (`wall_seconds`, summed over sessions in meta.json)."""
    progress = tqdm(total=total, initial=total - len(todo), desc=p.name, unit="sample", dynamic_ncols=True)
    last = time.perf_counter()
    for records in _finished(p.task, generator, todo, p.batch_size):
        now = time.perf_counter()
        for record in records:
            record["wall_seconds"] = round((now - last) / len(records), 4)
            folder.append(record)
            done[record["id"]] = record
        last = now
        progress.update(len(records))
    progress.close()


def _finished(task, generator: Generator, todo: list[dict], batch_size):
    """The records of the samples that finish together, in the order they finish."""
    device = next(generator.model.parameters()).device
    if hasattr(task, "prepare") and batch_plan(generator.model, batch_size, device)[0] > 1:
        prompts = (task.prepare(sample, generator) for sample in todo)
        for i, prompt, generation in generator.run_many(prompts, batch_size):
            yield [task.record(todo[i], prompt, generation, generator)]
        return
    size = getattr(task, "batch_size", 1)
    for start in range(0, len(todo), size):
        batch = todo[start : start + size]
        yield task.evaluate_batch(batch, generator) if size > 1 else [task.evaluate(batch[0], generator)]


def finish(p: Plan, folder: RunFolder, meta: dict, records: list[dict]) -> tuple[dict, dict, list[dict]] | None:
    """Write what the run (or shard) leaves; (scores, meta, records) of the whole run, or None while other
    shards of it are still running."""
    if p.shard.sharded:  # this shard's meta; the last shard to finish merges them all
        return finish_shard(folder, p.shard, p.stored, meta, records)
    scores = summarize(p.task, p.labels, records, p.stored)
    folder.write_scores(scores)
    folder.write_meta(meta)
    return scores, meta, records


def run_config(cfg: DictConfig | dict, model=None, tokenizer=None, command: str | None = None) -> RunResult:
    """Run one config to completion (resuming what is on disk) with its model, or with `model` and `tokenizer`;
    `command` is what meta.json records as the command (default: this process's command line)."""
    p = plan(resolve(cfg))
    resolved = p.resolved
    preflight.check_task_method(p.task, p.method)
    folder = p.folder
    if folder.finished(resolved) or (p.shard.sharded and shard_done(folder, p.shard, resolved)):
        # a rerun of a sweep skips its finished runs (and shards) without loading the model
        log.info("%s: finished already, skipping -> %s", p.name, folder.path)
        _list_in_sweep(folder.path)
        return _load_finished(folder) if (folder.path / "scores.json").exists() else RunResult(folder.path, {}, {}, [])
    preflight.check_writable(folder.path)
    check_free(folder.path / p.shard.lock_name)  # another process on this run (shard): fail before loading the model

    name_job("-".join(p.labels.values()) + p.shard.label.replace("/", "-"))
    session_start = time.perf_counter()
    seed = int(resolved.get("seed", 0))
    random.seed(seed)
    torch.manual_seed(seed)
    if model is None:
        model, tokenizer = models.load(resolved["model"])
    preflight.check_context(p.task, p.method, model)
    device = next(model.parameters()).device
    samples = p.shard.select(tasks.limit_samples(p.task, p.task.samples(tokenizer), resolved["task"].get("limit")))

    folder.path.mkdir(parents=True, exist_ok=True)  # only once everything above is valid
    lock = RunLock(folder.path / p.shard.lock_name).acquire()  # one writer per predictions file; released below
    tracker = None
    try:  # everything up to the sample loop: an error here must not leave the lock held (the API's process lives on)
        folder.open(p.stored)
        done, todo = resume(p, folder, samples)
        tracker = _tracker(p, folder)
        generator = Generator(model, tokenizer, p.method, p.budget,
                              chat_format=resolved["model"].get("chat_format", "none"),
                              chat_template_kwargs=dict(resolved["model"].get("chat_template_kwargs") or {}),
                              max_prompt_tokens=resolved["model"].get("max_prompt_tokens"))
    except BaseException:
        if tracker is not None:  # W&B started: mark its run failed rather than leave it open
            tracker.finish(exit_code=1)
        lock.release()
        raise
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = datetime.now(UTC)
    try:
        loop(p, folder, generator, todo, done, len(samples))
        records = [done[s["id"]] for s in samples]
        meta = {
            **p.labels,
            "run_id": p.run_id,
            "git": git_commit(),
            "versions": package_versions(),
            "device": device_info(device),
            **where_run(),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seed": seed,
            "started": started.isoformat(timespec="seconds"),
            **session_wall(records, time.perf_counter() - session_start),
            "samples": len(records),
            "samples_this_session": len(todo),
            "samples_on_disk": len(done),
            "batch_size": batch_plan(model, p.batch_size, device)[0],  # most sequences per decode step
            "batch_size_setting": p.batch_size,
            "timing": timing_meta(records),
            "memory": peak_memory(device),
            "kv": kv_meta(records),
            "command": command or _command_line(),
            "sample_ids": [s["id"] for s in samples],
        }
        merged = finish(p, folder, meta, records)
        if merged:
            tracker.log_results(*merged)
    except BaseException:
        tracker.finish(exit_code=1)  # W&B marks the run failed/crashed, not finished and empty
        raise
    finally:
        lock.release()
    tracker.finish()
    _list_in_sweep(folder.path)
    summary = merged[0]["scores"] if merged else "shard done, waiting for the other shards"
    log.info("%s: %s (n=%d) -> %s", p.name, summary, len(records), folder.path)
    return RunResult(folder.path, *merged) if merged else RunResult(folder.path, {}, meta, records)


def _batch_setting(value) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or str(size) != str(value).strip():
        raise KVBenchError(f"run.batch_size={value} must be a whole number >= 1 or auto")
    return size


def execute(cfg: DictConfig | dict) -> Path:
    """Run one config to completion (resuming what is on disk); return the run folder."""
    return run_config(cfg).path


def _load_finished(folder: RunFolder) -> RunResult:
    scores = json.loads((folder.path / "scores.json").read_text())
    meta_path = folder.path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    order = meta.get("sample_ids")
    records = folder.records()
    if order:
        by_id = {r["id"]: r for r in records}
        records = [by_id[i] for i in order if i in by_id]
    return RunResult(folder.path, scores, meta, records)


def _tracker(p: Plan, folder: RunFolder) -> Tracker:
    budget = p.budget
    config = {
        **p.stored,
        "model_name": p.labels["model"],
        "task_name": p.labels["task"],
        "method_name": p.labels["method"],
        "budget_label": p.labels["budget"],
        "budget_tokens": budget.tokens if budget else None,
        "budget_ratio": budget.ratio if budget else None,
    }
    return Tracker(p.resolved.get("logger"), p.name, _group(p.resolved), config, list(p.labels.values()),
                   run_folder=folder.path)


# ----------------------------------------------------------------------------- Hydra context of this job


def _sweep_listing() -> Path | None:
    """`<sweep dir>/runs.txt` when this job is part of a Hydra multirun."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir) / "runs.txt"


def _list_in_sweep(path: Path) -> None:
    """Add a run folder to its sweep's runs.txt (the sweep table is built from that list)."""
    listing = _sweep_listing()
    if listing is not None:
        with open(listing, "a") as f:
            f.write(f"{path}\n")


def _command_line() -> str:
    """`kvbench run <overrides>` of this job (no machine paths)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else sys.argv[1:]
    return " ".join(["kvbench run", *overrides])


def _group(cfg: dict) -> str | None:
    if cfg.get("experiment_name"):
        return cfg["experiment_name"]
    listing = _sweep_listing()
    return f"sweep-{listing.parent.parent.name}-{listing.parent.name}" if listing else None
