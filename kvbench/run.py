"""Entry point: one run = model x method x budget x task, configured by Hydra.

    python -m kvbench.run                                   # the defaults in configs/config.yaml
    python -m kvbench.run model=tiny method=streamingllm budget.tokens=64
    python -m kvbench.run -m method=full,streamingllm budget.tokens=32,64   # multirun sweep
    python -m kvbench.run -m experiment=demo

`execute(cfg)` does the work and is importable; `main()` adds the one-line
errors for mistakes a user can fix.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kvbench import KVBenchError, methods, models, tasks
from kvbench.cache import Budget
from kvbench.generation import Generator
from kvbench.results import (
    RunFolder,
    device_info,
    git_commit,
    kv_meta,
    package_versions,
    peak_memory,
    run_path,
    timing_meta,
)
from kvbench.tracking import Tracker

log = logging.getLogger("kvbench")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
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


def execute(cfg: DictConfig | dict) -> Path:
    """Run one config to completion (resuming what is on disk); return the run folder."""
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    method = methods.build(resolved["method"])
    budget = Budget.from_config(resolved.get("budget") or {}) if method.compresses else None
    if budget is not None and budget.tokens is None and budget.ratio is None:
        raise KVBenchError(f"method '{method.name}' needs a budget: budget.tokens=N, or budget=ratio budget.ratio=R")
    task = tasks.build(resolved["task"])
    limit = resolved["task"].get("limit")
    labels = run_labels(resolved, task, method, budget)
    folder = RunFolder(run_path(resolved["paths"]["results"], **labels))
    name = "/".join(labels.values())
    if folder.finished(resolved):  # a rerun of a sweep skips its finished runs without loading the model
        log.info("%s: finished already, skipping -> %s", name, folder.path)
        _list_in_sweep(folder.path)
        return folder.path

    seed = int(resolved.get("seed", 0))
    random.seed(seed)
    torch.manual_seed(seed)
    model, tokenizer = models.load(resolved["model"])
    device = next(model.parameters()).device
    samples = task.samples(tokenizer)
    if limit is not None:
        samples = samples[: int(limit)]

    folder.open(resolved)  # checked and created only once everything above is valid
    done = {r["id"]: r for r in folder.records()}
    todo = [s for s in samples if s["id"] not in done]
    resumed = len(samples) - len(todo)
    if resumed:
        log.info("%s: %d of %d samples already on disk, resuming", name, resumed, len(samples))

    config_for_tracking = {
        **resolved,
        "model_name": labels["model"],
        "task_name": labels["task"],
        "method_name": labels["method"],
        "budget_label": labels["budget"],
        "budget_tokens": budget.tokens if budget else None,
        "budget_ratio": budget.ratio if budget else None,
    }
    tracker = Tracker(resolved.get("logger"), name, _group(resolved), config_for_tracking, list(labels.values()))
    generator = Generator(
        model, tokenizer, method, budget,
        chat_format=resolved["model"].get("chat_format", "none"),
        max_prompt_tokens=resolved["model"].get("max_prompt_tokens"),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    try:
        batch_size = getattr(task, "batch_size", 1)
        progress = tqdm(total=len(samples), initial=resumed, desc=name, unit="sample", dynamic_ncols=True)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            batch_records = task.evaluate_batch(batch, generator) if batch_size > 1 else [task.evaluate(batch[0], generator)]
            for record in batch_records:
                folder.append(record)
                done[record["id"]] = record
            progress.update(len(batch))
        progress.close()
        wall = time.perf_counter() - t0

        records = [done[s["id"]] for s in samples]
        subtask_scores = task.score(records)
        scores = {
            **labels,
            "scores": subtask_scores,
            "average": round(sum(subtask_scores.values()) / len(subtask_scores), 2) if subtask_scores else None,
            "n": len(records),
            **(task.score_details(records) if hasattr(task, "score_details") else {}),
        }
        meta = {
            **labels,
            "git": git_commit(),
            "versions": package_versions(),
            "device": device_info(device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seed": seed,
            "started": started.isoformat(timespec="seconds"),
            "wall_seconds": round(wall, 3),
            "samples": len(records),
            "samples_this_session": len(todo),
            "timing": timing_meta(records),
            "memory": peak_memory(device),
            "kv": kv_meta(records),
            "command": _command_line(),
        }
        folder.write_scores(scores)
        folder.write_meta(meta)
        tracker.log_results(scores, meta, records)
    finally:
        tracker.finish()
    _list_in_sweep(folder.path)
    log.info("%s: %s (n=%d) -> %s", name, subtask_scores, len(records), folder.path)
    return folder.path


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


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> str:
    try:
        return str(execute(cfg))
    except KVBenchError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        sys.exit(2)


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


def main() -> None:
    problem = check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    if problem:
        print(f"kvbench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
