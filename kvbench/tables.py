"""Aggregate run folders into tables: rows model x method x budget, columns sub-tasks + Avg.

    python -m kvbench.tables                       # every run -> results/tables/all.{md,csv,tex}
    python -m kvbench.tables --name demo --model tiny --task passkey
    python -m kvbench.tables --results results /mnt/node2/results   # runs made on several machines

After a Hydra multirun, `kvbench.run.SweepTableCallback` writes
`results/tables/<table_name>.*` from exactly the runs of that sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from kvbench.results import atomic_write_text

INDEX = ["model", "method", "budget"]


def load_run(folder: Path) -> list[dict]:
    """One row per sub-task of a finished run (a folder with scores.json and config.yaml)."""
    scores = json.loads((folder / "scores.json").read_text())
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    rows = []
    for subtask, value in scores.get("scores", {}).items():
        rows.append(
            {
                "model": scores.get("model", cfg.get("model", {}).get("name")),
                "task": scores.get("task"),
                "method": scores.get("method"),
                "budget": scores.get("budget"),
                "budget_tokens": (cfg.get("budget") or {}).get("tokens"),
                "budget_ratio": (cfg.get("budget") or {}).get("ratio"),
                "subtask": subtask,
                "score": value,
                "n": scores.get("n"),
                "run": str(folder),
            }
        )
    return rows


def collect(folders) -> pd.DataFrame:
    rows = []
    for folder in folders:
        folder = Path(folder)
        if (folder / "scores.json").exists() and (folder / "config.yaml").exists():
            rows += load_run(folder)
    return pd.DataFrame(rows, columns=["model", "task", "method", "budget", "budget_tokens", "budget_ratio",
                                       "subtask", "score", "n", "run"])


def find_runs(results_dir: str | Path) -> list[Path]:
    return sorted(p.parent for p in (Path(results_dir) / "runs").glob("*/*/*/*/scores.json"))


def _budget_order(label: str) -> tuple:
    if label == "full":
        return (0, 0.0)
    for prefix, rank in (("tokens", 1), ("ratio", 2)):
        if str(label).startswith(prefix):
            try:
                return (rank, float(label[len(prefix):]))
            except ValueError:
                pass
    return (3, 0.0)


def pivot(long: pd.DataFrame, subtask_order: list[str] | None = None) -> pd.DataFrame:
    """Rows (model, method, budget), columns sub-tasks in order, then Avg (mean of the row's scores)."""
    if long.empty:
        return pd.DataFrame(columns=INDEX + ["Avg"]).set_index(INDEX)
    table = long.pivot_table(index=INDEX, columns="subtask", values="score", aggfunc="last")
    columns = [c for c in (subtask_order or []) if c in table.columns]
    columns += [c for c in dict.fromkeys(long["subtask"]) if c not in columns]  # the order runs list them in
    table = table[columns]
    table["Avg"] = table.mean(axis=1).round(2)
    table.columns.name = None
    rows = sorted(
        table.index,
        key=lambda r: (str(r[0]), r[1] != "full", str(r[1]), _budget_order(r[2])),
    )
    return table.loc[rows]


def write(table: pd.DataFrame, out_dir: str | Path, name: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    flat = table.reset_index()
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "csv", "tex")}
    atomic_write_text(paths["md"], flat.to_markdown(index=False, floatfmt=".2f") + "\n")
    atomic_write_text(paths["csv"], flat.to_csv(index=False))
    atomic_write_text(paths["tex"], flat.to_latex(index=False, float_format="%.2f", na_rep="--"))
    return paths


def build_table(results_dir, name: str, folders=None, **filters) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Table of `folders` (default: every run under results_dir), filtered by column values."""
    long = collect(folders if folders is not None else find_runs(results_dir))
    for column, allowed in filters.items():
        if allowed:
            long = long[long[column].isin(list(allowed))]
    table = pivot(long)
    return table, write(table, Path(results_dir) / "tables", name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build result tables from kvbench run folders.")
    parser.add_argument("--results", nargs="+", default=["results"],
                        help="results folder(s) holding runs/ (made on several machines); tables go to the first")
    parser.add_argument("--name", default="all", help="table file name under results/tables/")
    for column in ("model", "task", "method", "budget"):
        parser.add_argument(f"--{column}", action="append", help=f"keep only these {column}s (repeatable)")
    args = parser.parse_args(argv)
    filters = {c: getattr(args, c) for c in ("model", "task", "method", "budget")}
    folders = [run for results in args.results for run in find_runs(results)]  # a run in several: the last wins
    table, paths = build_table(args.results[0], args.name, folders=folders, **filters)
    if table.empty:
        print(f"no finished runs under {', '.join(str(Path(r) / 'runs') for r in args.results)}", file=sys.stderr)
    else:
        print(table.reset_index().to_markdown(index=False, floatfmt=".2f"))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
