"""The one query for run folders: find the finished runs under a results folder, read them into one long table
(a row per run and sub-task, with the settings that tell same-labelled runs apart), and pick the newest run
when several carry the same labels. Tables, plots, claim rows and paper tables all read runs through here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import yaml

from kvbench.runner.identity import hashed_settings

FAMILIES = {"passkey": "retrieval", "multikey": "retrieval", "niah": "retrieval", "longbench": "longbench",
            "perplexity": "ppl", "ruler": "ruler", "math": "reasoning", "longbench_v2": "longbench_v2"}
COLUMNS = ["model", "task", "method", "budget", "budget_tokens", "budget_ratio", "subtask", "score", "n", "run",
           "family", "reference", "settings", "kept_per_head", "kv_ratio", "low", "high", "kv_end", "kv_peak"]



def natural_key(text) -> tuple:
    """'w32' < 'w64' < 'w128': digits compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(text)))


def family_of(task_name: str | None, task_label: str | None) -> str:
    if task_name in FAMILIES:
        return FAMILIES[task_name]
    label = str(task_label or task_name or "")
    if label.startswith("ppl_"):
        return "ppl"
    return "longbench" if label.startswith("longbench") else (label or "other")


def _flatten(tree, prefix="") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _kv_figures(folder: Path) -> dict:
    """From meta.json: mean prompt tokens kept per (layer, KV head), the prompt's kv_ratio, and what a
    sequence held per (layer, KV head) at the end of generation and at its peak."""
    path = folder / "meta.json"
    kv = json.loads(path.read_text()).get("kv", {}) if path.exists() else {}
    grid = kv.get("kv_kept_tokens_per_layer_head")
    kept = sum(map(sum, grid)) / sum(map(len, grid)) if grid else None
    return {"kept_per_head": round(kept, 2) if kept is not None else None, "kv_ratio": kv.get("kv_ratio"),
            "kv_end": kv.get("kv_end_tokens_per_head"), "kv_peak": kv.get("kv_peak_tokens_per_head")}


def load_run(folder: Path) -> list[dict]:
    """One row per sub-task of a finished run (a folder with scores.json and config.yaml)."""
    scores = json.loads((folder / "scores.json").read_text())
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    budget = cfg.get("budget") or {}
    method_name = (cfg.get("method") or {}).get("name") or str(scores.get("method"))
    base = {
        "model": scores.get("model", (cfg.get("model") or {}).get("name")),
        "task": scores.get("task"),
        "method": scores.get("method"),
        "budget": scores.get("budget"),
        "budget_tokens": budget.get("tokens"),
        "budget_ratio": budget.get("ratio"),
        "n": scores.get("n"),
        "run": str(folder),
        "family": family_of((cfg.get("task") or {}).get("name"), scores.get("task")),
        "reference": method_name == "full",  # a full cache, whatever its tag: a reference line, not a method
        "settings": "",
        **_kv_figures(folder),
        "_config": _flatten(hashed_settings(cfg)),
    }
    intervals = scores.get("intervals") or {}  # 95% bootstrap per sub-task (runs before it: none)
    return [{**base, "subtask": subtask, "score": value, "low": (intervals.get(subtask) or {}).get("low"),
             "high": (intervals.get(subtask) or {}).get("high")}
            for subtask, value in scores.get("scores", {}).items()]


def _label_settings(rows: list[dict]) -> None:
    """Fill `settings` for runs that share model/method/budget within a family and differ in a setting.

    The keys that tell runs of one task label apart are shown for every run of that (family, model,
    method, budget), so runs of sibling tasks with the same settings still share a table row."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["family"], row["model"], row["method"], row["budget"]), []).append(row)
    for group in groups.values():
        runs = {row["run"]: row for row in group}
        if len(runs) < 2:
            continue
        keys: set[str] = set()
        by_task: dict[str, list[dict]] = {}
        for row in runs.values():
            by_task.setdefault(row["task"], []).append(row["_config"])
        for configs in by_task.values():
            for key in set().union(*configs):
                if len({repr(c.get(key)) for c in configs}) > 1:
                    keys.add(key)
        for row in group:
            row["settings"] = ", ".join(f"{k}={row['_config'][k]}" for k in sorted(keys) if k in row["_config"])
        seen: dict[tuple, set] = {}  # still twins (settings outside the run id): name the folder
        for row in group:
            seen.setdefault((row["task"], row["subtask"], row["settings"]), set()).add(row["run"])
        for row in group:
            if len(seen[(row["task"], row["subtask"], row["settings"])]) > 1:
                row["settings"] = ", ".join(filter(None, [row["settings"], f"run={Path(row['run']).name}"]))


def collect(folders) -> pd.DataFrame:
    rows = []
    for folder in folders:
        folder = Path(folder)
        if (folder / "scores.json").exists() and (folder / "config.yaml").exists():
            rows += load_run(folder)
    _label_settings(rows)
    return pd.DataFrame(rows, columns=COLUMNS)


def find_runs(results_dir: str | Path) -> list[Path]:
    return sorted(p.parent for p in (Path(results_dir) / "runs").glob("*/*/*/*/scores.json"))


def newest(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the newest run (by its scores.json) among `rows` of a long table."""
    runs = list(dict.fromkeys(rows["run"]))
    if len(runs) < 2:
        return rows
    return rows[rows["run"] == max(runs, key=lambda run: (Path(run) / "scores.json").stat().st_mtime)]
