"""Aggregate run folders into tables, one per task family: rows model x method x budget, columns sub-tasks.

    kvbench table                       # every run -> results/tables/all_<family>.{md,csv,tex}
    kvbench table --name demo --model tiny --task passkey
    kvbench table --results results /mnt/node2/results   # runs made on several machines

Families (`kvbench.report.runs.FAMILIES`, from each run's config.yaml `task.name`): `retrieval` (passkey, multikey),
`longbench`, `ppl` (perplexity). A table never mixes families, so no average spans perplexity and
accuracy. Columns: the sub-tasks, `Avg` (accuracy families only, and only for a row that has every
column), and `n` (samples per run). A cell with a 95% interval (scores.json `intervals`, kvbench.tasks.stats)
reads `52.50 ± 4.10` in markdown and LaTeX, or `83.33 [43.65, 96.99]` when the interval is not centred on the
score (Wilson intervals of small samples); the CSV has `<column>_low` / `<column>_high`. Runs are labelled by model/task/method/budget as in scores.json;
when two runs share those labels, a `settings` column lists the config values that tell them apart.
After a Hydra multirun, `kvbench.report.sweep.SweepTableCallback` writes `results/tables/<sweep>_<family>.*`
from exactly the runs of that sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from kvbench.report.runs import collect, find_runs, natural_key
from kvbench.runner.folder import atomic_write_text

INDEX = ["model", "method", "budget"]


NO_AVERAGE = {"ppl"}  # families whose scores must not be averaged (perplexities)
OVERLAPPING = {"longbench_v2"}  # columns that are views of the same questions (overall, easy, hard, ...): no Avg


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


def _n_cell(values) -> object:
    counts = sorted({int(v) for v in values if pd.notna(v)})
    if not counts:
        return None
    return counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def pivot(long: pd.DataFrame, subtask_order: list[str] | None = None) -> pd.DataFrame:
    """One family's table: rows (model, [task], method, budget, [settings]), columns sub-tasks, Avg, n.

    `task` is a row key only when one sub-task name occurs under two task labels (LongBench and
    LongBench-E); `settings` only when some run has one. Avg is the mean of a complete row
    (accuracy families only, more than one column); n is the sample count of the row's runs."""
    if long.empty:
        return pd.DataFrame(columns=INDEX + ["n"]).set_index(INDEX)
    needs_task = (long.groupby("subtask")["task"].nunique() > 1).any()
    index = ["model", *(["task"] if needs_task else []), "method", "budget",
             *(["settings"] if (long["settings"] != "").any() else [])]
    table = long.pivot_table(index=index, columns="subtask", values="score", aggfunc="last")
    columns = [c for c in (subtask_order or []) if c in table.columns]
    rest = [c for c in dict.fromkeys(long["subtask"]) if c not in columns]
    if set(long["family"]) & NO_AVERAGE:
        rest = sorted(rest, key=natural_key)  # ppl_x_w32, ppl_x_w64, ppl_x_w128
    table = table[columns + rest]
    if len(table.columns) > 1 and not set(long["family"]) & (NO_AVERAGE | OVERLAPPING):
        table["Avg"] = table.mean(axis=1).round(2).where(table.notna().all(axis=1))
    if "reasoning" in set(long["family"]):  # long generation: the KV a sequence really held, per (layer, KV head)
        for column, key in (("KV end", "kv_end"), ("KV peak", "kv_peak")):
            table[column] = long.groupby(index, dropna=False)[key].mean().round(1).reindex(table.index)
    table["n"] = long.groupby(index, dropna=False)["n"].agg(_n_cell).reindex(table.index)
    table.columns.name = None
    refs = set(long.loc[long["reference"], "method"])
    rows = sorted(table.index, key=lambda r: (
        str(r[0]), *([str(r[1])] if needs_task else []), r[index.index("method")] not in refs,
        str(r[index.index("method")]), _budget_order(r[index.index("budget")]), natural_key(r[-1]),
    ))
    return table.loc[rows]


def interval_bounds(long: pd.DataFrame, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(low, high) of each cell's 95% interval, shaped like `table` (NaN where a run has none), or None when
    no run has intervals. Avg's is Avg -/+ sqrt(sum of the row's half-widths^2) / k (disjoint samples)."""
    with_ci = long.dropna(subset=["low", "high"])
    if with_ci.empty:
        return None
    bounds = []
    for side in ("low", "high"):
        cells = with_ci.pivot_table(index=table.index.names, columns="subtask", values=side, aggfunc="last")
        frame = pd.DataFrame(index=table.index, columns=table.columns, dtype=float)
        subtasks = [c for c in table.columns if c in cells.columns]
        frame.loc[:, subtasks] = cells.reindex(table.index)[subtasks].astype(float).to_numpy()
        bounds.append(frame)
    low, high = bounds
    if "Avg" in table.columns:
        inner = [c for c in table.columns if c not in ("Avg", "n")]
        half = (((high[inner] - low[inner]) / 2) ** 2).sum(axis=1, min_count=len(inner)) ** 0.5 / len(inner)
        low["Avg"], high["Avg"] = table["Avg"] - half, table["Avg"] + half
    return low, high


def _cell(value, low, high) -> str | None:
    """`52.50 ± 4.10` for an interval centred on the value (within 5% of its width), else `83.33 [43.65, 96.99]`."""
    if pd.isna(value):
        return None
    if pd.isna(low) or pd.isna(high):
        return f"{value:.2f}"
    half = (high - low) / 2
    if abs((low + high) / 2 - value) <= 0.05 * max(half, 1e-9):
        return f"{value:.2f} ± {half:.2f}"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _with_intervals(table: pd.DataFrame, bounds) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells as text with their intervals (`_cell`); the numbers with `<col>_low` / `<col>_high` columns for
    the CSV)."""
    shown, numbers = table.copy().astype(object), table.copy()
    if bounds is None:
        return shown, numbers
    low, high = bounds
    for column in [c for c in table.columns if c != "n" and low[c].notna().any()]:
        shown[column] = [_cell(v, lo, hi) for v, lo, hi in zip(table[column], low[column], high[column])]
        numbers[f"{column}_low"] = low[column].round(4)
        numbers[f"{column}_high"] = high[column].round(4)
    return shown, numbers


def write(table: pd.DataFrame, out_dir: str | Path, name: str, bounds=None) -> dict[str, Path]:
    """`<name>.{md,csv,tex}`; with `bounds` (`interval_bounds`) the markdown and LaTeX cells read
    `52.50 ± 4.10` and the CSV has `<column>_low` / `<column>_high` columns."""
    out_dir = Path(out_dir)
    shown, numbers = _with_intervals(table, bounds)
    flat, flat_csv = (t.reset_index().astype(object) for t in (shown, numbers))
    flat, flat_csv = (t.where(t.notna(), None) for t in (flat, flat_csv))  # blank cells, never "nan"
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "csv", "tex")}
    atomic_write_text(paths["md"], flat.to_markdown(index=False, floatfmt=".2f", missingval="") + "\n")
    atomic_write_text(paths["csv"], flat_csv.to_csv(index=False))
    tex = flat.to_latex(index=False, float_format="%.2f", na_rep="").replace("±", "$\\pm$")
    atomic_write_text(paths["tex"], tex)
    return paths


def build_tables(results_dir, name: str, folders=None, **filters) -> dict[str, tuple[pd.DataFrame, dict[str, Path]]]:
    """One table per task family of `folders` (default: every run under results_dir), filtered by column
    values; written as `<results_dir>/tables/<name>_<family>.{md,csv,tex}`. Returns {family: (table, paths)}."""
    long = collect(folders if folders is not None else find_runs(results_dir))
    for column, allowed in filters.items():
        if allowed:
            long = long[long[column].isin(list(allowed))]
    out = {}
    for family in sorted(set(long["family"])):
        rows = long[long["family"] == family]
        table = pivot(rows)
        out[family] = table, write(table, Path(results_dir) / "tables", f"{name}_{family}", interval_bounds(rows, table))
    return out


def render(tables: dict[str, tuple[pd.DataFrame, dict[str, Path]]]) -> str:
    """The tables as markdown under a heading per family (what the CLI and a sweep print)."""
    return "\n\n".join(f"## {family}\n\n{paths['md'].read_text().rstrip()}" for family, (_, paths) in tables.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build result tables (one per task family) from kvbench run folders.")
    parser.add_argument("--results", nargs="+", default=["results"],
                        help="results folder(s) holding runs/ (made on several machines); tables go to the first")
    parser.add_argument("--name", default="all", help="tables are written as results/tables/<name>_<family>.*")
    for column in ("model", "task", "method", "budget"):
        parser.add_argument(f"--{column}", action="append", help=f"keep only these {column}s (repeatable)")
    args = parser.parse_args(argv)
    filters = {c: getattr(args, c) for c in ("model", "task", "method", "budget")}
    folders = [run for results in args.results for run in find_runs(results)]  # a run in several: the last wins
    tables = build_tables(args.results[0], args.name, folders=folders, **filters)
    if not tables:
        print(f"no finished runs under {', '.join(str(Path(r) / 'runs') for r in args.results)}", file=sys.stderr)
        return 0
    print(render(tables))
    print(f"\nwrote {', '.join(str(p) for _, paths in tables.values() for p in paths.values())}")
    from kvbench.report.heatmaps import niah_runs, write_heatmaps

    # needle runs: their heatmaps beside the tables
    maps = write_heatmaps(niah_runs(folders), Path(args.results[0]) / "plots" / "niah")
    if maps:
        print(f"wrote {len(maps)} needle heatmaps to {maps[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
