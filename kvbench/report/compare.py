"""Two methods on the same samples: a paired comparison per sub-task (kvbench.tasks.stats).

    kvbench compare h2o snapkv --budget tokens64                 # every model/task both ran at that budget
    kvbench compare h2o/tokens64 snapkv/tokens256 --task passkey_prose
    kvbench compare results/runs/<model>/<task>/h2o/<budget>-<id> results/runs/.../snapkv/...   # two folders

A side is a run folder, or `method[/budget]` matched among the finished runs under `--results` (the newest
run per labels). Runs pair up by model and task (and budget, when neither side names one); each sub-task
shows A and B on their common samples, B - A with its 95% paired-bootstrap interval, B's wins / losses / ties
per sample (per 64-token block for perplexity, lower is better) with the sign test's p-value, and whether the
difference is significant (the interval excludes 0 and p < 0.05).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from kvbench import tasks
from kvbench.report.runs import collect, find_runs, newest
from kvbench.runner.folder import read_records
from kvbench.tasks.stats import Units, paired, task_units


def run_units(folder: str | Path) -> dict[str, Units]:
    """Every sub-task's resampling units of a finished run folder (its task rebuilt from config.yaml)."""
    folder = Path(folder)
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    task = tasks.build(cfg["task"])
    return task_units(task, read_records(folder / "predictions.jsonl"))


def compare_runs(a: str | Path, b: str | Path) -> list[dict]:
    """One row per sub-task the two runs share: `paired(A, B)`."""
    units_a, units_b = run_units(a), run_units(b)
    return [{"subtask": subtask, **paired(units_a[subtask], units_b[subtask])}
            for subtask in units_a if subtask in units_b]


def _runs_of(long: pd.DataFrame, side: str) -> pd.DataFrame:
    method, _, budget = side.partition("/")
    rows = long[long["method"] == method]
    return rows[rows["budget"] == budget] if budget else rows


def pairs(long: pd.DataFrame, a: str, b: str) -> list[tuple[str, str]]:
    """(run A, run B) folders: the newest run of each side per model and task (and budget when neither
    side names one)."""
    keys = ["model", "task"] + ([] if "/" in a or "/" in b else ["budget"])
    runs_a, runs_b = _runs_of(long, a), _runs_of(long, b)
    out = []
    for key, group_a in runs_a.groupby(keys):
        group_b = runs_b
        for column, value in zip(keys, key):
            group_b = group_b[group_b[column] == value]
        if not group_b.empty:
            out.append((newest(group_a)["run"].iloc[0], newest(group_b)["run"].iloc[0]))
    return out


def table(rows: list[tuple[str, str, list[dict]]]) -> str:
    lines = ["| A | B | sub-task | n | A score | B score | B - A (95% CI) | significant | B wins/losses/ties | sign p |",
             "|:--|:--|:--|--:|--:|--:|:--|:--|:--|--:|"]
    for a, b, results in rows:
        for r in results:
            if not r["n_units"]:
                lines.append(f"| {a} | {b} | {r['subtask']} | 0 | | | no common samples | | | |")
                continue
            lines.append(f"| {a} | {b} | {r['subtask']} | {r['n_units']} | {r['a']:.2f} | {r['b']:.2f} | "
                         f"{r['delta']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] | {'yes' if r['significant'] else 'no'} "
                         f"| {r['wins']}/{r['losses']}/{r['ties']} | {r['sign_p']:.3g} |")
    return "\n".join(lines)


def _label(folder: str) -> str:
    parts = Path(folder).parts
    return "/".join(parts[-4:-1] + (parts[-1].rsplit("-", 1)[0],)) if len(parts) >= 4 else folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvbench compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="a run folder, or method[/budget]")
    parser.add_argument("b", help="a run folder, or method[/budget]")
    parser.add_argument("--results", default="results")
    parser.add_argument("--model", action="append")
    parser.add_argument("--task", action="append")
    parser.add_argument("--budget", action="append")
    args = parser.parse_args(argv)
    if Path(args.a).is_dir() and Path(args.b).is_dir():
        found = [(args.a, args.b)]
    else:
        long = collect(find_runs(args.results))
        for column in ("model", "task", "budget"):
            if getattr(args, column):
                long = long[long[column].isin(getattr(args, column))]
        found = pairs(long, args.a, args.b) if not long.empty else []
    if not found:
        print(f"kvbench: error: no finished runs of both {args.a} and {args.b} under {args.results}/runs "
              "(with these filters); see `kvbench status` or pass two run folders", file=sys.stderr)
        return 2
    print(table([(_label(a), _label(b), compare_runs(a, b)) for a, b in found]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
