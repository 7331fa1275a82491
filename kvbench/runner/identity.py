"""Run identity: a run folder's readable parts and a short hash of every setting that changes results.

    results/runs/<model>/<task>/<method>[-<run.tag>]/<budget>-<hash8>/

The hash (`run_id`) is the first 8 hex digits of the SHA-256 of the canonical
JSON (sorted keys, no spaces) of `hashed_settings(cfg)`: the model (weights,
dtype, attention, max prompt, chat format), the task, the method (stage,
positions included), the budget and the seed. What only changes how many
samples run or where and how (`task.num_samples`, `task.limit`,
`model.device`, the logger, `paths.*`, every `run.*` key) is left out, so
`num_samples=50` after `num_samples=20` resumes the same folder. A path under
`paths.results` is hashed relative to it (`${paths.results}/...`), so moving
the results folder keeps every run's id.
"""

from __future__ import annotations

import hashlib
import json

# config sections that change what a run computes; limit and num_samples only change how many samples
HASHED_SECTIONS = ("model", "task", "method", "budget", "seed")
IGNORED_KEYS = {"model": {"device"}, "task": {"limit", "num_samples"}}  # sample i is the same whatever the count


def _relative_paths(value, root: str | None):
    """`value` with every string under the results folder written as `${paths.results}/...`."""
    if isinstance(value, dict):
        return {k: _relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_paths(v, root) for v in value]
    if root and isinstance(value, str) and value.startswith(root.rstrip("/") + "/"):
        return "${paths.results}/" + value[len(root.rstrip("/")) + 1 :]
    return value


def hashed_settings(cfg: dict) -> dict:
    """The settings a run's results depend on (a resolved config in, a plain dict out)."""
    out = {}
    for section in HASHED_SECTIONS:
        value = cfg.get(section)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in IGNORED_KEYS.get(section, set())}
        out[section] = value
    if (cfg.get("method") or {}).get("name") == "full":
        out["budget"] = None  # a full cache ignores the budget
    return _relative_paths(out, (cfg.get("paths") or {}).get("results"))


def run_id(cfg: dict) -> str:
    """8 hex digits that name the settings of `hashed_settings(cfg)`; stable across machines and sessions."""
    text = json.dumps(hashed_settings(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def differing_settings(settings: list[dict]) -> list[str]:
    """For runs that share their readable labels: per run, the settings in which they differ, as
    `key=value` joined by spaces ("" when they do not differ); a table labels such rows with it."""
    flat = [_flatten(s or {}) for s in settings]
    keys = sorted({k for f in flat for k in f if len({repr(g.get(k)) for g in flat}) > 1})
    return [" ".join(f"{k}={f.get(k)}" for k in keys) for f in flat]
