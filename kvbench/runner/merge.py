"""Join the shards of a run into its `predictions.jsonl`, `scores.json` and `meta.json`.

    kvbench merge results/runs/tiny/passkey/full/full      # after the shards of that run

The last shard to finish does this by itself; the command is for a merge that did not happen
(a shard's job died after its last sample). Records come back in the task's sample order, so the
merged files equal those of an unsharded run (timing fields aside); meta.json sums wall time and
tokens over the shards, keeps the largest peak memory, and lists each shard's host and device.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from kvbench.errors import KVBenchError, error_exit
from kvbench.runner.folder import RunFolder, atomic_write_json, atomic_write_text, read_records
from kvbench.runner.lock import RunLock
from kvbench.runner.provenance import kv_meta, timing_meta
from kvbench.runner.scoring import summarize
from kvbench.runner.shards import Shard, interleave

SHARD_META = re.compile(r"meta\.(\d+)-of-(\d+)\.json")
LABELS = ("model", "task", "method", "budget")


def _counts(cfg: dict) -> list:
    return [(cfg.get("task") or {}).get(k) for k in ("limit", "num_samples")]


def shard_metas(path: Path) -> dict[int, dict[int, dict]]:
    """{num_shards: {shard index: meta}} of the finished shards in a run folder."""
    out: dict[int, dict[int, dict]] = {}
    for file in Path(path).glob("meta.*-of-*.json"):
        match = SHARD_META.fullmatch(file.name)
        if match:
            out.setdefault(int(match.group(2)), {})[int(match.group(1))] = json.loads(file.read_text())
    return out


def shard_done(folder: RunFolder, shard: Shard, resolved: dict) -> bool:
    """True when this shard of exactly these settings and sample count has finished (its meta is on disk).

    Then the run is merged if every shard is done and that did not happen (the last job died first).
    """
    meta_path = folder.path / shard.meta_name
    if not meta_path.exists() or not (folder.path / "config.yaml").exists() or folder._changes(resolved):
        return False
    if json.loads(meta_path.read_text()).get("counts") != _counts(resolved):
        return False
    merge(folder.path, shard.count, quiet=True)
    return True


def finish_shard(folder: RunFolder, shard: Shard, resolved: dict, meta: dict, records: list[dict]):
    """Write this shard's meta; merge the run when every shard is done. (scores, meta, records) or None."""
    shard_meta = {**meta, "shard": shard.index, "num_shards": shard.count, "counts": _counts(resolved),
                  "ids": [r["id"] for r in records]}
    atomic_write_json(folder.path / shard.meta_name, shard_meta)
    return merge(folder.path, shard.count, quiet=True)


def merge(path: Path, num_shards: int | None = None, task=None, quiet: bool = False):
    """Merge the shards in `path`; None (or, unless quiet, an error) when some are missing or another merges."""
    path = Path(path)
    groups = shard_metas(path)
    if num_shards is None:
        if len(groups) != 1:
            if not groups and (path / "scores.json").exists():
                raise KVBenchError(f"{path} holds no shards: it is merged already (or was never sharded)")
            if not groups:
                raise KVBenchError(f"{path} has no finished shards (meta.<i>-of-<N>.json) to merge")
            raise KVBenchError(f"{path} holds shards of several splits ({sorted(groups)}); pass --num-shards N")
        num_shards = next(iter(groups))
    metas = groups.get(num_shards, {})
    missing = [i for i in range(num_shards) if i not in metas]
    if missing:
        if quiet:
            return None
        raise KVBenchError(f"{path}: shard(s) {', '.join(map(str, missing))} of {num_shards} not finished; run them first")
    try:
        lock = RunLock(path / ".lock.merge").acquire()
    except KVBenchError:
        if quiet:
            return None  # another shard is merging right now
        raise
    try:
        return _merge_locked(path, [metas[i] for i in range(num_shards)], task)
    finally:
        lock.release()


def _merge_locked(path: Path, metas: list[dict], task):
    n = len(metas)
    files = [path / "predictions.jsonl"] + [path / Shard(i, n).predictions_name for i in range(n)]
    by_id: dict = {}
    for file in files:
        for record in read_records(file):
            by_id.setdefault(record["id"], record)
    order = interleave([m["ids"] for m in metas])
    lost = [i for i in order if i not in by_id]
    if lost:
        raise KVBenchError(f"{path}: {len(lost)} finished sample(s) are missing from the shard files (e.g. {lost[0]}); rerun the shards")
    records = [by_id[i] for i in order]
    cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if task is None:
        from kvbench import tasks

        task = tasks.build(cfg["task"])
    labels = {k: metas[0][k] for k in LABELS}
    scores = summarize(task, labels, records, cfg)
    meta = combine_meta(metas, records)
    atomic_write_text(path / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(path / "scores.json", scores)
    atomic_write_json(path / "meta.json", meta)
    for i in range(n):  # everything is in the merged files now
        (path / Shard(i, n).predictions_name).unlink(missing_ok=True)
        (path / Shard(i, n).meta_name).unlink(missing_ok=True)
    return scores, meta, records


SHARD_KEYS = ("host", "slurm", "device", "started", "wall_seconds", "samples", "samples_this_session", "memory", "command")


def combine_meta(metas: list[dict], records: list[dict]) -> dict:
    """meta.json of a sharded run: summed wall time and tokens, the largest peak memory, each shard's device."""
    first = metas[0]
    meta = {k: v for k, v in first.items() if k not in ("shard", "num_shards", "counts", "ids", "host", "slurm")}
    peak = max((m.get("memory") or {} for m in metas), key=lambda m: m.get("peak_memory_bytes") or 0)
    meta.update(
        started=min(m["started"] for m in metas),
        wall_seconds=round(sum(m["wall_seconds"] for m in metas), 3),  # summed over shards (device-seconds)
        wall_seconds_longest_shard=max(m["wall_seconds"] for m in metas),
        samples=len(records),
        sample_ids=[r["id"] for r in records],
        samples_this_session=sum(m["samples_this_session"] for m in metas),
        timing=timing_meta(records),
        memory=peak,
        kv=kv_meta(records),
        num_shards=len(metas),
        shards=[{"shard": m["shard"], **{k: m.get(k) for k in SHARD_KEYS}} for m in metas],
    )
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Merge the shards of a kvbench run folder.")
    parser.add_argument("folders", nargs="+", help="run folder(s) holding predictions.<i>-of-<N>.jsonl")
    parser.add_argument("--num-shards", type=int, default=None, help="which split to merge when several are on disk")
    args = parser.parse_args(argv)
    try:
        for folder in args.folders:
            scores, _, records = merge(Path(folder), args.num_shards)
            print(f"{folder}: merged {len(records)} samples, average {scores['average']}")
    except KVBenchError as err:
        return error_exit(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
