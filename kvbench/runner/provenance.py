"""What meta.json records about where and how a run ran: git commit, package versions, device, peak memory,
the KV kept, and timings summed over the sessions of a resumed run."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def git_commit() -> dict:
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("kvbench", "torch", "transformers", "datasets", "hydra-core", "wandb", "flash-attn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_max_allocated"}
    import resource

    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "process_max_rss",
    }


def kv_meta(records: list[dict]) -> dict:
    """KV kept vs a full cache over the prompt, summed over samples, and the tokens decoded apart.

    kv_kept_tokens / kv_full_tokens / bytes, kv_ratio and the per-(layer, head) grids count the
    prompt alone (the cache right after prefill and its compression), so a head's budget is not
    inflated by the answer; kv_decoded_tokens sums the tokens decoded into the cache (per sequence)
    and kv_end_kept_tokens the cache at the end of generation (over every layer and head), kv_peak_tokens the
    most it held at once; kv_end/peak_tokens_per_head: one sequence's, per (layer, KV head), mean over samples."""
    keys = ("kv_kept_tokens", "kv_full_tokens", "kv_kept_bytes", "kv_full_bytes", "kv_decoded_tokens", "kv_end_kept_tokens",
            "kv_peak_tokens")
    sums = {k: sum(r.get(k, 0) for r in records) for k in keys}
    # what one sequence held per (layer, KV head), on average over samples: at the end and at its peak
    cells = [(r, sum(len(row) for row in r["kv_kept_per_layer_head"])) for r in records if r.get("kv_kept_per_layer_head")]
    for key, out in (("kv_end_kept_tokens", "kv_end_tokens_per_head"), ("kv_peak_tokens", "kv_peak_tokens_per_head")):
        values = [r[key] / n for r, n in cells if key in r and n]
        if values:
            sums[out] = round(sum(values) / len(values), 2)
    sums["kv_ratio"] = round(sums["kv_kept_bytes"] / sums["kv_full_bytes"], 6) if sums["kv_full_bytes"] else None
    sums["kv_prompt_only"] = all("kv_decoded_tokens" in r for r in records if "kv_kept_tokens" in r)  # older records: no
    fractions, grids = [], []  # per record: kept / prompt tokens of each (layer, head); every head sees the prompt
    for record in records:
        grid = record.get("kv_kept_per_layer_head")
        if grid:
            seen = record.get("kv_seen_tokens") or record["kv_full_tokens"] / sum(len(row) for row in grid)
            fractions.append([[kept / seen for kept in row] for row in grid])
            grids.append(grid)
    if fractions:
        sums["kv_kept_fraction_per_layer_head"] = _mean_grid(fractions, 4)
        sums["kv_kept_tokens_per_layer_head"] = _mean_grid(grids, 2)  # per-head budgets (HeadKV) show here
    by_type = [r["kv_layer_types"] for r in records if r.get("kv_layer_types")]
    if by_type:  # per layer type (full / sliding window): layers, window, budget, mean kept tokens per head
        sums["kv_layer_types"] = {
            kind: {**entry, "kept_per_head": round(sum(t[kind]["kept_per_head"] for t in by_type) / len(by_type), 2)}
            for kind, entry in by_type[0].items()
        }
    return sums


def _mean_grid(grids: list[list[list[float]]], digits: int) -> list[list[float]]:
    mean = [[sum(cells) / len(grids) for cells in zip(*rows)] for rows in zip(*grids)]
    return [[round(x, digits) for x in row] for row in mean]


def timing_meta(records: list[dict]) -> dict:
    """Generation time of the records, summed over every session that wrote them: prefill (the prompt's
    forward pass and compression) and decode apart, each with its tokens/s. The first new token comes
    from the prefill's logits; decode tokens/s is new tokens over decode time. Decoded in batches
    (`run.batch_size`), a sample's seconds overlap others': the throughput is `samples_per_s` and
    `new_tokens_per_wall_s`, over the wall time of the sample loops."""
    seconds = sum(r.get("seconds", 0.0) for r in records)
    prompt = sum(r.get("n_prompt", 0) for r in records)
    new = sum(r.get("n_new", 0) for r in records)
    split = all("prefill_seconds" in r for r in records) and new > 0  # perplexity streams: no prefill/decode
    wall = sum(r.get("wall_seconds", r.get("seconds", 0.0)) for r in records)
    prefill = sum(r.get("prefill_seconds", 0.0) for r in records) if split else None
    decode = seconds - prefill if split else None
    per_s = lambda tokens, secs: round(tokens / secs, 2) if secs else None  # noqa: E731
    return {
        "generation_seconds": round(seconds, 3),
        "prefill_seconds": round(prefill, 3) if split else None,
        "decode_seconds": round(decode, 3) if split else None,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "tokens_per_s": per_s(prompt + new, seconds),
        "prefill_tokens_per_s": per_s(prompt, prefill) if split else None,
        "new_tokens_per_s": per_s(new, decode) if split else None,
        "samples_per_s": per_s(len(records), wall),
        "new_tokens_per_wall_s": per_s(new, wall),
    }


def session_wall(records: list[dict], this_session: float) -> dict:
    """Wall time of the sample loop summed over the sessions that wrote `records` (each record holds its
    share), and this session's wall time from start to scores (model loading included)."""
    return {
        "wall_seconds": round(sum(r.get("wall_seconds", r.get("seconds", 0.0)) for r in records), 3),
        "wall_seconds_this_session": round(this_session, 3),
    }
