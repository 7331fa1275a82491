"""What is left of a sweep: each run as finished / partial (n of m samples, which shards) / missing.

    kvbench status                          # every run folder under results/
    kvbench status /shared/kvbench/results  # a results folder (or one run folder, or runs/<model>)
    kvbench status demo                     # the runs experiment=demo's sweep makes
    kvbench status demo task=passkey paths.results=/shared/kvbench/results
    kvbench status method=full,streamingllm budget.tokens=32,64   # an ad-hoc sweep: its overrides
    kvbench status multirun/2026-12-04/10-00-00                   # a sweep folder (Hydra's multirun dir)

For an experiment or overrides, the sweep (`hydra.sweeper.params`, with the sweep overrides given here
on top) is expanded to the run folders it writes, so runs not started yet show as missing; a sweep
folder is read the same way from its `multirun.yaml` (the command line it ran), with the run folders
its jobs listed in `runs.txt`. Hydra's own folders (`.hydra`) are never runs. A run being written
shows its holder (host, pid) from its lock file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from kvbench.errors import KVBenchError, error_exit
from kvbench.runner.folder import read_records
from kvbench.runner.lock import holder, is_stale
from kvbench.runner.merge import shard_metas
from kvbench.runner.shards import Shard
from kvbench.runner.sweeps import jobs


def _expected_total(cfg: dict, scores: dict | None) -> int | None:
    task = cfg.get("task") or {}
    counts = [int(c) for c in (task.get("limit"), task.get("num_samples")) if c is not None]
    if counts:
        return min(counts)
    return scores.get("n") if scores else None


def _running(path: Path) -> str | None:
    info = holder(path)
    if info is None or is_stale(info):
        return None
    return f"running on {info.get('host')} pid {info.get('pid')}"


def _num_shards(folder: Path) -> int:
    """N of the shard files in a folder (predictions.<i>-of-<N>.jsonl, meta.<i>-of-<N>.json, .lock.<i>-of-<N>)."""
    counts = {p.name.split("-of-")[1].split(".")[0] for p in folder.glob("*-of-*")}
    return max((int(c) for c in counts if c.isdigit()), default=1)


def folder_state(folder: Path, expected: dict | None = None) -> dict:
    """{state, done, total, detail} of one run folder (state: finished | partial | missing).

    `expected`: the config the run should have (its sample count); default: the folder's config.yaml.
    """
    folder = Path(folder)
    if not (folder / "config.yaml").exists():
        return {"state": "missing", "done": 0, "total": None, "detail": ""}
    cfg = expected or yaml.safe_load((folder / "config.yaml").read_text()) or {}
    scores = json.loads((folder / "scores.json").read_text()) if (folder / "scores.json").exists() else None
    total = _expected_total(cfg, scores)
    n = _num_shards(folder)
    files = [folder / "predictions.jsonl"] + ([folder / Shard(i, n).predictions_name for i in range(n)] if n > 1 else [])
    done = len({r["id"] for f in files for r in read_records(f)})
    details = []
    if n > 1:
        finished = shard_metas(folder).get(n, {})
        parts = {"done": [], "running": [], "partial": [], "not started": []}
        for i in range(n):
            shard = Shard(i, n)
            running = _running(folder / shard.lock_name)
            if i in finished:
                parts["done"].append(str(i))
            elif running:
                parts["running"].append(f"{i} ({running.removeprefix('running on ')})")
            elif (folder / shard.predictions_name).exists():
                parts["partial"].append(str(i))
            else:
                parts["not started"].append(str(i))
        details.append(f"shards of {n}: " + "; ".join(f"{k} {', '.join(v)}" for k, v in parts.items() if v))
    else:
        running = _running(folder / ".lock")
        if running:
            details.append(running)
    if scores is not None and n == 1 and (total is None or scores.get("n") == total):
        state = "finished"
    else:
        state = "partial"
    return {"state": state, "done": done, "total": total, "detail": "; ".join(details)}


def run_folders(root: Path) -> list[Path]:
    """Run folders (holding config.yaml) at or under `root`."""
    root = Path(root)
    if (root / "config.yaml").exists():
        return [root]
    return sorted(p.parent for p in root.rglob("config.yaml")
                  if "tables" not in p.parts and not any(part.startswith(".") for part in p.relative_to(root).parts))


def sweep_runs(sweep_dir: Path) -> dict[Path, dict | None]:
    """The runs of a Hydra sweep folder: what its command line plans (multirun.yaml), and what its jobs wrote
    (runs.txt)."""
    runs: dict[Path, dict | None] = {}
    saved = sweep_dir / "multirun.yaml"
    if saved.exists():
        hydra = (yaml.safe_load(saved.read_text()) or {}).get("hydra") or {}
        overrides = list((hydra.get("overrides") or {}).get("task") or [])
        experiment = ((hydra.get("runtime") or {}).get("choices") or {}).get("experiment")
        experiment = None if experiment in (None, "null", "None") else experiment
        runs.update(expected_runs(experiment, [o for o in overrides if not o.startswith("experiment=")]))
    listing = sweep_dir / "runs.txt"
    for line in listing.read_text().split() if listing.exists() else []:
        runs.setdefault(Path(line), None)
    return runs


def expected_runs(experiment: str | None, overrides: list[str]) -> dict[Path, dict]:
    """{run folder: resolved config} of experiment=<name>'s sweep (its sweeper params, overridden by `overrides`),
    or of the sweep `overrides` alone (no experiment)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvbench.resources import CONFIG_DIR
    from kvbench.runner.run import plan

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        named = [f"experiment={experiment}"] if experiment else []
        base = compose("config", overrides=named, return_hydra_config=True)
        params = {str(k): str(v) for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()}
        fixed, combos = jobs(params, overrides)
        runs = {}
        for combo in combos:
            cfg = compose("config", overrides=[*named, *fixed, *combo])
            resolved = OmegaConf.to_container(cfg, resolve=True)
            runs.setdefault(plan(resolved).path, resolved)
    return runs


def report(runs: dict[Path, dict | None]) -> str:
    rows, counts = [], {"finished": 0, "partial": 0, "missing": 0}
    for folder, expected in runs.items():
        st = folder_state(folder, expected)
        counts[st["state"]] += 1
        progress = f"{st['done']} of {st['total'] if st['total'] is not None else '?'}"
        rows.append((st["state"], progress if st["state"] != "missing" else "", str(folder), st["detail"]))
    widths = [max([len(r[i]) for r in rows] + [0]) for i in range(3)]
    lines = [f"{s:<{widths[0]}}  {p:>{widths[1]}}  {f:<{widths[2]}}  {d}".rstrip() for s, p, f, d in rows]
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()) + f" (of {len(runs)} runs)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    target = args.pop(0) if args and "=" not in args[0] else None
    try:
        if target is None and args:  # an ad-hoc sweep: its overrides
            runs = expected_runs(None, args)
        elif target is not None and ((Path(target) / "multirun.yaml").exists() or (Path(target) / "runs.txt").exists()):
            if args:
                raise KVBenchError("a sweep folder's runs come from its own command line; drop the overrides")
            runs = sweep_runs(Path(target))
        elif target is not None and not Path(target).exists():
            from kvbench.resources import CONFIG_DIR

            choices = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
            if target not in choices:
                raise KVBenchError(f"'{target}' is neither a folder nor an experiment; experiments: {', '.join(choices)}")
            runs = expected_runs(target, args)
        else:
            if args:
                raise KVBenchError("overrides (key=value) go with an experiment name, not with a folder")
            root = Path(target or "results")
            runs = dict.fromkeys(run_folders(root))
            if not runs:
                raise KVBenchError(f"no run folders under {root}")
    except KVBenchError as err:
        return error_exit(err)
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
