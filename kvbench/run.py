"""Entry point: one run = model x method x budget x task, configured by Hydra.

    python -m kvbench.run                                   # the defaults in configs/config.yaml
    python -m kvbench.run model=tiny method=streamingllm budget.tokens=64
    python -m kvbench.run -m method=full,streamingllm budget.tokens=32,64   # multirun sweep
    python -m kvbench.run -m experiment=demo

`execute(cfg)` does the work and is importable; `main()` adds the one-line
errors for mistakes a user can fix.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kvbench import KVBenchError, error_exit, methods, models, preflight, tasks
from kvbench.cache import Budget
from kvbench.generation import Generator
from kvbench.identity import hashed_settings, run_id
from kvbench.lock import RunLock, check_free
from kvbench.merge import finish_shard, shard_done, summarize
from kvbench.resources import CONFIG_DIR
from kvbench.results import (
    RunFolder,
    device_info,
    git_commit,
    kv_meta,
    package_versions,
    peak_memory,
    read_records,
    run_path,
    session_wall,
    timing_meta,
)
from kvbench.shards import Shard
from kvbench.tracking import Tracker

log = logging.getLogger("kvbench")
GROUPS = ("model", "method", "budget", "task", "logger", "experiment")


def run_labels(cfg: dict, task, method, budget: Budget | None) -> dict:
    tag = (cfg.get("run") or {}).get("tag")
    return {
        "model": cfg["model"]["name"],
        "task": getattr(task, "label", task.name),
        "method": f"{method.label}-{tag}" if tag else method.label,
        "budget": budget.label if budget is not None else "full",
    }


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
    """`python -m kvbench.run <overrides>` of this job (no machine paths)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else sys.argv[1:]
    return " ".join(["python -m kvbench.run", *overrides])


def _group(cfg: dict) -> str | None:
    if cfg.get("experiment_name"):
        return cfg["experiment_name"]
    listing = _sweep_listing()
    return f"sweep-{listing.parent.parent.name}-{listing.parent.name}" if listing else None


@dataclass
class RunResult:
    """What a run leaves: its folder, scores.json's content, meta.json's, and the records of its samples."""

    path: Path | None
    scores: dict
    meta: dict = field(repr=False)
    records: list[dict] = field(repr=False)


def execute(cfg: DictConfig | dict) -> Path:
    """Run one config to completion (resuming what is on disk); return the run folder."""
    return run_config(cfg).path


def _resolve(cfg: DictConfig | dict) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    resolved["model"] = models.resolve_config(resolved["model"])
    return resolved


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


def plan(resolved: dict):
    """What a resolved config runs, without loading anything: (method, budget, task, labels, run folder path)."""
    method = methods.build(resolved["method"])
    budget = Budget.from_config(resolved.get("budget") or {}) if method.compresses else None
    if budget is not None and budget.tokens is None and budget.ratio is None:
        raise KVBenchError(f"method '{method.name}' needs a budget: budget.tokens=N, or budget=ratio budget.ratio=R")
    task = tasks.build(resolved["task"])
    labels = run_labels(resolved, task, method, budget)
    return method, budget, task, labels, run_path(resolved["paths"]["results"], **labels, run_id=run_id(resolved))


def run_config(cfg: DictConfig | dict, model=None, tokenizer=None, command: str | None = None) -> RunResult:
    """Run one config to completion (resuming what is on disk) with its model, or with `model` and `tokenizer`;
    `command` is what meta.json records as the command (default: this process's command line)."""
    resolved = _resolve(cfg)
    method, budget, task, labels, path = plan(resolved)
    preflight.check_task_method(task, method)
    limit = resolved["task"].get("limit")
    identity = run_id(resolved)
    shard = Shard.from_config(resolved)
    folder = RunFolder(path, shard.predictions_name)
    name = "/".join(labels.values()) + shard.label
    if folder.finished(resolved) or (shard.sharded and shard_done(folder, shard, resolved)):
        # a rerun of a sweep skips its finished runs (and shards) without loading the model
        log.info("%s: finished already, skipping -> %s", name, folder.path)
        _list_in_sweep(folder.path)
        return _load_finished(folder) if (folder.path / "scores.json").exists() else RunResult(folder.path, {}, {}, [])
    preflight.check_writable(folder.path)
    check_free(folder.path / shard.lock_name)  # another process on this run (shard): fail before loading the model

    session_start = time.perf_counter()
    seed = int(resolved.get("seed", 0))
    random.seed(seed)
    torch.manual_seed(seed)
    if model is None:
        model, tokenizer = models.load(resolved["model"])
    preflight.check_context(task, method, model)
    device = next(model.parameters()).device
    samples = shard.select(tasks.limit_samples(task, task.samples(tokenizer), limit))

    stored = {**resolved, "run_id": identity, "run_settings": hashed_settings(resolved)}
    folder.path.mkdir(parents=True, exist_ok=True)  # only once everything above is valid
    lock = RunLock(folder.path / shard.lock_name).acquire()  # one writer per predictions file; released below
    tracker = None
    try:  # everything up to the sample loop: an error here must not leave the lock held (the API's process lives on)
        folder.open(stored)
        done = {r["id"]: r for r in read_records(folder.path / "predictions.jsonl")} if shard.sharded else {}
        done.update({r["id"]: r for r in folder.records()})
        todo = [s for s in samples if s["id"] not in done]
        resumed = len(samples) - len(todo)
        if resumed:
            log.info("%s: %d of %d samples already on disk, resuming", name, resumed, len(samples))

        config_for_tracking = {
            **stored,
            "model_name": labels["model"],
            "task_name": labels["task"],
            "method_name": labels["method"],
            "budget_label": labels["budget"],
            "budget_tokens": budget.tokens if budget else None,
            "budget_ratio": budget.ratio if budget else None,
        }
        tracker = Tracker(resolved.get("logger"), name, _group(resolved), config_for_tracking, list(labels.values()),
                          run_folder=folder.path)
        generator = Generator(
            model, tokenizer, method, budget,
            chat_format=resolved["model"].get("chat_format", "none"),
            max_prompt_tokens=resolved["model"].get("max_prompt_tokens"),
        )
    except BaseException:
        if tracker is not None:  # W&B started: mark its run failed rather than leave it open
            tracker.finish(exit_code=1)
        lock.release()
        raise
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = datetime.now(UTC)
    try:
        batch_size = getattr(task, "batch_size", 1)
        progress = tqdm(total=len(samples), initial=resumed, desc=name, unit="sample", dynamic_ncols=True)
        last = time.perf_counter()
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            batch_records = task.evaluate_batch(batch, generator) if batch_size > 1 else [task.evaluate(batch[0], generator)]
            now = time.perf_counter()
            for record in batch_records:
                record["wall_seconds"] = round((now - last) / len(batch_records), 4)  # summed over sessions in meta
                folder.append(record)
                done[record["id"]] = record
            last = now
            progress.update(len(batch))
        progress.close()

        records = [done[s["id"]] for s in samples]
        meta = {
            **labels,
            "run_id": identity,
            "git": git_commit(),
            "versions": package_versions(),
            "device": device_info(device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seed": seed,
            "started": started.isoformat(timespec="seconds"),
            **session_wall(records, time.perf_counter() - session_start),
            "samples": len(records),
            "samples_this_session": len(todo),
            "samples_on_disk": len(done),
            "timing": timing_meta(records),
            "memory": peak_memory(device),
            "kv": kv_meta(records),
            "command": command or _command_line(),
            "sample_ids": [s["id"] for s in samples],
        }
        if shard.sharded:  # this shard's meta; the last shard to finish merges them all
            meta["host"] = platform.node()
            merged = finish_shard(folder, shard, stored, meta, records)
        else:
            merged = summarize(task, labels, records, stored), meta, records
            folder.write_scores(merged[0])
            folder.write_meta(meta)
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
    log.info("%s: %s (n=%d) -> %s", name, summary, len(records), folder.path)
    return RunResult(folder.path, *merged) if merged else RunResult(folder.path, {}, meta, records)


class SweepTableCallback(Callback):
    """After a multirun, write `results/tables/<table_name>_<family>.*` and a plot from the runs of that sweep.

    `table_name` is the experiment's name; an ad-hoc sweep is named after its sweep folder
    (`sweep-<date>-<time>`, as its W&B group), so one sweep never overwrites another's table."""

    def __init__(self, results_dir: str = "results", table_name: str | None = None):
        self.results_dir = results_dir
        self.table_name = table_name

    def on_multirun_end(self, config, **kwargs) -> None:
        from kvbench.plots import budget_vs_score
        from kvbench.tables import build_tables, collect, render

        sweep_dir = Path(config.hydra.sweep.dir)
        listing = sweep_dir / "runs.txt"
        if not listing.exists():
            return
        name = self.table_name or f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"
        folders = sorted(set(listing.read_text().split()))
        tables = build_tables(self.results_dir, name, folders=folders)
        written = [str(paths["md"]) for _, paths in tables.values()]
        print(f"\n{render(tables)}\n\nwrote {', '.join(written)}")
        plot = Path(self.results_dir) / "plots" / f"{name}_budget_vs_score.png"
        if budget_vs_score(collect(folders), plot, title=name):
            print(f"wrote {plot}")


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> str:
    try:
        return str(execute(cfg))
    except KVBenchError as err:
        sys.exit(error_exit(err))


def check_overrides(overrides: list[str]) -> str | None:
    """A one-line message for an unknown config choice (`method=foo`) or a budget <= 0, before Hydra starts."""
    for arg in overrides:
        match = re.fullmatch(r"([a-z_]+)=(.*)", arg)
        if not match:
            budget = re.fullmatch(r"budget\.(tokens|ratio)=(.*)", arg)
            if budget:
                for value in budget.group(2).split(","):
                    try:
                        bad = float(value) <= 0
                    except ValueError:
                        bad = value not in ("null", "") and not value.startswith(("range(", "choice("))
                    if bad:
                        return f"budget.{budget.group(1)}={value}: a budget must be a number > 0"
            continue
        group, values = match.groups()
        if group not in GROUPS or any(ch in values for ch in "()[]{}$*"):
            continue
        choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        for value in values.split(","):
            if group == "experiment" and value == "null":
                continue
            if value not in choices:
                return f"unknown {group} '{value}'; choose one of: {', '.join(choices)}"
    return None


def first_job_of_sweep(argv: list[str]) -> list[str]:
    """`-m ... --cfg job|hydra|all`, which Hydra refuses, as the arguments of the sweep's first job."""
    from kvbench.sweeps import jobs

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    fixed, combos = jobs({}, overrides)
    flags = [a for a in argv if a not in overrides and a not in ("-m", "--multirun")]
    print(f"kvbench: a sweep of {len(combos)} job(s) on the command line (experiment sweeps aside); "
          f"the config of the first: {' '.join(combos[0]) or '(no swept keys)'}", file=sys.stderr)
    return flags + fixed + combos[0]


def main() -> None:
    problem = check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    if problem:
        print(f"kvbench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if {"-m", "--multirun"} & set(sys.argv) and {"--cfg", "-c"} & set(sys.argv):
        sys.argv[1:] = first_job_of_sweep(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
