"""A fixed set of tiny-model runs, and a byte-for-byte comparison of two such sets (timing fields aside).

Guards refactors that must not change behaviour: run it on the old code, then on the new one, then compare.

    python scripts/snapshot_runs.py run OUT_DIR [--quick]    # every method on passkey, ppl_synthetic, LongBench
                                                             # fixtures, and a sharded run (~4 min on 2 cores)
    python scripts/snapshot_runs.py compare OLD_DIR NEW_DIR  # exit 0 when every prediction and score is equal
        [--ignore-identity]                                  # scores.json's run_id / settings aside (data moved)
        [--allow-added-fields]                               # fields only NEW's records have: listed, not compared

Runs go through the command line (`python -m kvbench run ...`), as a user makes them. Files are matched by
their labels (model/task/method/budget) and name, not by run id, so a change of the id's hashing shows as a
missing file rather than passing silently. Fields that hold wall-clock times are dropped before comparing;
everything else in predictions*.jsonl and scores.json must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = "tests/fixtures"
METHODS = ("full,streamingllm,h2o,h2o-sink4,vatp,vatp-scissorhands,scissorhands,snapkv,pyramidkv,ada_snapkv,"
           "headkv,tova,weightedkv")
DECODE_METHODS = "full,streamingllm,h2o,h2o-sink4,vatp,scissorhands,tova,weightedkv"
TIME_KEYS = ("seconds", "wall", "started", "time", "tokens_per_s")
IDENTITY_KEYS = ("run_id", "settings")  # scores.json's run id and hashed settings: they hold data paths


def sweeps(out: Path, fixtures: str) -> list[list[str]]:
    common = [f"paths.results={out}", "logger=none", "model=tiny", f"paths.head_scores={fixtures}/head_scores",
              f"hydra.sweep.dir={out}/multirun/${{now:%H-%M-%S-%f}}"]
    return [
        ["-m", "task=passkey", f"method={METHODS}", "budget.tokens=64,256", "task.num_samples=3",
         "task.context_tokens=512", *common],
        ["-m", "task=ppl_synthetic", f"method={DECODE_METHODS}", "budget.tokens=64", "task.num_samples=2",
         "task.num_tokens=256", "task.window=256", *common],
        ["-m", "task=longbench", "method=full,snapkv,h2o,headkv", "budget.tokens=64", f"task.data_dir={fixtures}/longbench",
         "task.download=false", "task.subsets=[lcc,trec,hotpotqa]", "model.max_prompt_tokens=512", *common],
        ["-m", "task=multikey", "method=snapkv", "budget.tokens=64", "task.num_samples=4", "task.context_tokens=512",
         "run.num_shards=2", "run.shard=0,1", *common],
    ]


def run(out: Path, fixtures: str) -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    for args in sweeps(out, fixtures):
        print("python -m kvbench run", " ".join(args), flush=True)
        done = subprocess.run([sys.executable, "-m", "kvbench", "run", *args], cwd=ROOT, env=env)
        if done.returncode:
            return done.returncode
    return 0


def strip_times(value):
    if isinstance(value, dict):
        return {k: strip_times(v) for k, v in value.items() if not any(t in k for t in TIME_KEYS)}
    if isinstance(value, list):
        return [strip_times(v) for v in value]
    return value


def drop_identity(rows: list) -> list:
    return [{k: v for k, v in row.items() if k not in IDENTITY_KEYS} for row in rows]


def files(root: Path) -> dict[str, list]:
    """{labels/filename: parsed content without timing fields} of every run folder under root/runs."""
    found = {}
    for path in sorted((root / "runs").rglob("*")):
        if path.name == "scores.json" or (path.name.startswith("predictions") and path.suffix == ".jsonl"):
            model, task, method, budget_and_id = path.relative_to(root / "runs").parts[:4]
            labels = (model, task, method, budget_and_id.rsplit("-", 1)[0])  # <budget>-<run id>: the id dropped
            text = path.read_text(encoding="utf-8")
            rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else [json.loads(text)]
            found["/".join([*labels, path.name])] = strip_times(rows)
    return found


def drop_added(old_rows: list, new_rows: list, added: set) -> list:
    """The new rows without the fields the old rows lack (collected into `added`)."""
    out = []
    for old_row, new_row in zip(old_rows, new_rows, strict=False):
        extra = set(new_row) - set(old_row) if isinstance(new_row, dict) and isinstance(old_row, dict) else set()
        added |= extra
        out.append({k: v for k, v in new_row.items() if k not in extra} if extra else new_row)
    return out + new_rows[len(out):]


def compare(old: Path, new: Path, ignore_identity: bool = False, allow_added: bool = False) -> int:
    a, b = files(old), files(new)
    if allow_added:
        added: set = set()
        b = {k: drop_added(a[k], v, added) if k in a else v for k, v in b.items()}
        print(f"fields only the new records have (not compared): {', '.join(sorted(added)) or 'none'}")
    if ignore_identity:
        moved = sorted(k for k in set(a) & set(b) if k.endswith("scores.json") and a[k] != b[k]
                       and drop_identity(a[k]) == drop_identity(b[k]))
        for key in moved:
            print(f"identity only (run id / hashed settings) differs: {key}")
        a = {k: drop_identity(v) if k.endswith("scores.json") else v for k, v in a.items()}
        b = {k: drop_identity(v) if k.endswith("scores.json") else v for k, v in b.items()}
    problems = [f"only in {old}: {k}" for k in sorted(set(a) - set(b))]
    problems += [f"only in {new}: {k}" for k in sorted(set(b) - set(a))]
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            first = next(i for i, (x, y) in enumerate(zip(a[key], b[key], strict=False)) if x != y) \
                if len(a[key]) == len(b[key]) else "count"
            problems.append(f"differs: {key} (row {first})")
    for line in problems:
        print(line)
    print(f"{len(set(a) & set(b))} files compared, {len(problems)} problem(s)")
    return 1 if problems or not a else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="make the fixed set of runs under OUT")
    r.add_argument("out", type=Path)
    r.add_argument("--fixtures", default=FIXTURES, help="the LongBench rows and head-score files (relative to the repo)")
    c = sub.add_parser("compare", help="compare two sets made by `run`")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    c.add_argument("--ignore-identity", action="store_true",
                   help="compare scores.json without run_id and settings (they change when a data path moves)")
    c.add_argument("--allow-added-fields", action="store_true",
                   help="a field only the new records have is listed, not a difference (a new meta field)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.out, args.fixtures)
    return compare(args.old, args.new, args.ignore_identity, args.allow_added_fields)


if __name__ == "__main__":
    sys.exit(main())
