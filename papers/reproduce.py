"""Paper tables with kvbench's numbers beside them: paper / ours / Δ (ours − paper), in the paper's layout.

    python -m papers.reproduce weightedkv_ppl                 # run the sweep (finished runs are skipped), then the table
    python -m papers.reproduce vatp_longbench --scale smoke   # the same on the tiny model and bundled data, CPU
    python -m papers.reproduce weightedkv_ppl --no-run        # only rebuild the table from the runs on disk
    make reproduce-table EXP=weightedkv_ppl SCALE=smoke

Each paper table is a CSV under `papers/reported/` in the paper's layout (row
keys, then value columns; a `# source:` first line cites the paper). A
`PaperTable` maps every (row, column) cell to one of our runs declaratively:
`base`, then the row's and the column's entries give the run's labels
(model, task, method, budget: the folder under results/runs/) and the score
column (`subtask`, or `AVG` for the run's average). At smoke scale, `smoke`
substitutes labels (the tiny model, synthetic text, smaller budgets): the
table keeps the paper's rows and columns, but its numbers are not comparable: a smoke table has
our numbers only (no paper, no Δ column).
Writes `results/tables/<experiment>.{md,csv,tex}` (`<experiment>_smoke.*` at smoke scale): the
csv is plain (`pd.read_csv` reads it); notes (scale, cells several runs could fill) head the md
and go to `<name>.notes.txt`. Each sweep pass writes its own run table,
`<experiment>_runs[_<pass>]_<family>.*`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

from kvbench.errors import KVBenchError, error_exit
from kvbench.report.runs import collect, find_runs, newest
from kvbench.runner.folder import atomic_write_text
from papers.tables import AVG, PAPER_DIR, PAPER_TABLES, PaperTable, paper_frame

KINDS = ("paper", "ours", "Δ")
SCALES = ("full", "smoke", "cpu")  # cpu: SmolLM2-135M on real text, claim rows (papers/claims.py)
SMOKE_NOTE = ("SMOKE SCALE: these numbers come from the tiny model (trained on synthetic data) on bundled or synthetic "
              "data; they check the pipeline and are not comparable with the paper (so no paper or Δ columns).")


def _one_run(rows: pd.DataFrame, notes: list[str], where: str) -> pd.DataFrame:
    """The rows of one run: the newest when several runs carry the cell's labels (noted with their settings)."""
    runs = list(dict.fromkeys(rows["run"]))
    if len(runs) == 1:
        return rows
    shown = newest(rows)
    settings = " | ".join(sorted(set(rows["settings"]) - {""})) or ", ".join(Path(r).name for r in runs)
    note = f"{where}: {len(runs)} runs carry these labels ({settings}); the newest is shown ({shown['run'].iloc[0]})"
    if note not in notes:
        notes.append(note)
    return shown


def _cell_rows(long: pd.DataFrame, labels: dict | None, notes: list[str] | None = None) -> pd.DataFrame | None:
    """The long-table rows of the one run the labels name (its sub-task's row, or all for AVG), or None."""
    if labels is None or long.empty:
        return None
    rows = long[(long["model"] == labels["model"]) & (long["task"] == labels["task"])
                & (long["method"] == labels["method"])]
    if not labels.get("budget_any"):  # a full cache ignores the budget: one run for every budget column
        rows = rows[rows["budget"] == labels["budget"]]
    if rows.empty:
        return None
    where = "/".join(str(labels[k]) for k in ("model", "task", "method") if k in labels)
    rows = _one_run(rows, notes if notes is not None else [], where)
    if labels["subtask"] == AVG:
        return rows
    hit = rows[rows["subtask"] == labels["subtask"]]
    return None if hit.empty else hit


def our_value(long: pd.DataFrame, labels: dict | None, notes: list[str] | None = None) -> float | None:
    """The score of the run the labels name (the mean of its sub-tasks for AVG), or None if not on disk."""
    rows = _cell_rows(long, labels, notes)
    if rows is None:
        return None
    return round(float(rows["score"].mean()), 2) if labels["subtask"] == AVG else float(rows["score"].iloc[0])


def our_half_width(long: pd.DataFrame, labels: dict | None) -> float | None:
    """Half the width of our cell's 95% interval (AVG: sqrt(sum h^2) / k), None when the run has none."""
    rows = _cell_rows(long, labels)
    if rows is None or rows["low"].isna().any() or rows["high"].isna().any():
        return None
    half = (rows["high"].astype(float) - rows["low"].astype(float)) / 2
    return round(float((half**2).sum() ** 0.5 / len(half)), 2)


def compare(table: PaperTable, long: pd.DataFrame, scale: str = "full", paper_dir: Path = PAPER_DIR) -> pd.DataFrame:
    """The paper's rows; for each of its columns, (column, paper), (column, ours), (column, Δ), and when our
    runs have intervals (column, ±) = half our 95% interval and (column, in CI) = whether |Δ| <= ± (the paper's
    number inside our interval).

    At smoke scale only (column, ours) (and ±): those numbers are not comparable with the paper's.
    `frame.attrs["notes"]` lists cells that several runs could fill (the newest is used)."""
    paper = paper_frame(table, paper_dir)
    out, inside, notes = {}, {}, []
    for column in paper.columns:
        cells = [table.labels(key, column, scale) for key in paper.index]
        ours = [our_value(long, labels, notes) for labels in cells]
        halves = [our_half_width(long, labels) for labels in cells]
        theirs = [None if pd.isna(v) else float(v) for v in paper[column]]
        if scale != "smoke":
            out[(column, "paper")] = theirs
        out[(column, "ours")] = ours
        if any(h is not None for h in halves):
            out[(column, "±")] = halves
        if scale != "smoke":
            delta = [None if o is None or p is None else round(o - p, 2) for o, p in zip(ours, theirs)]
            out[(column, "Δ")] = delta
            if any(h is not None for h in halves):
                inside[(column, "in CI")] = [None if d is None or h is None else ("yes" if abs(d) <= h else "no")
                                             for d, h in zip(delta, halves)]
    frame = pd.DataFrame(out, index=paper.index).astype("float64")
    for key, values in inside.items():
        frame[key] = pd.Series(values, index=paper.index, dtype=object)
    order = [key for column in paper.columns for kind in ("paper", "ours", "±", "Δ", "in CI")
             if (key := (column, kind)) in frame.columns]
    frame = frame[order]
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    frame.attrs["notes"] = notes
    return frame


def write(frame: pd.DataFrame, out_dir: Path, name: str, note: str) -> dict[str, Path]:
    """md (notes on top), a plain csv (`pd.read_csv` reads it), tex, and `<name>.notes.txt` with the notes."""
    kinds = set(frame.columns.get_level_values(1))
    flat = frame.copy()
    flat.columns = [column if len(kinds) == 1 else f"{column} {kind}" for column, kind in frame.columns]
    flat = flat.reset_index().astype(object)
    flat = flat.where(flat.notna(), None)  # blank cells, not "nan"
    notes = [note, *frame.attrs.get("notes", [])]
    paths = {ext: Path(out_dir) / f"{name}.{ext}" for ext in ("md", "csv", "tex")}
    paths["notes"] = Path(out_dir) / f"{name}.notes.txt"
    md = flat.to_markdown(index=False, floatfmt=".2f", missingval="")
    atomic_write_text(paths["md"], "\n\n".join(notes) + f"\n\n{md}\n")
    atomic_write_text(paths["csv"], flat.to_csv(index=False))
    atomic_write_text(paths["notes"], "\n".join(notes) + "\n")
    tex = (frame if len(kinds) > 1 else frame.droplevel(1, axis=1)).to_latex(
        float_format="%.2f", na_rep="", multicolumn_format="c")
    atomic_write_text(paths["tex"], "".join(f"% {line}\n" for line in notes) + tex)
    return paths


def pass_table_name(experiment: str, overrides: list[str]) -> str:
    """`<experiment>_runs` for the main sweep, `<experiment>_runs_<what the pass changes>` for the others."""
    parts = [value if "." not in key else f"{key.rsplit('.', 1)[1]}{value}"
             for key, _, value in (o.partition("=") for o in overrides)]
    return "_".join([f"{experiment}_runs", *(["-".join(parts)] if parts else [])])


def run_sweeps(table: PaperTable, scale: str, results: str, extra: list[str]) -> None:
    """Each pass of the experiment's Hydra multirun; a finished run is skipped, a failed one stops here."""
    experiment = table.experiment + ("" if scale == "full" else f"_{scale}")
    for overrides in table.passes:
        cmd = [sys.executable, "-m", "kvbench", "run", "-m", f"experiment={experiment}", f"paths.results={results}",
               f"hydra.callbacks.sweep_table.table_name={pass_table_name(experiment, overrides)}", *overrides, *extra]
        print("+ kvbench run " + " ".join(cmd[4:]), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise KVBenchError(f"the sweep of {experiment} failed (see above); fix it and rerun: finished runs are kept")


def sweep_folders(table: PaperTable, scale: str, results: str, extra: list[str]) -> list[Path]:
    """The run folders of the experiment's own sweep (every pass): other runs in `results` with the same
    labels (another experiment's SnapKV at 64 tokens, with another window) must not stand in for them."""
    from kvbench.runner.status import expected_runs

    experiment = table.experiment + ("" if scale == "full" else f"_{scale}")
    folders = {folder for overrides in table.passes
               for folder in expected_runs(experiment, [*overrides, f"paths.results={results}", *extra])}
    return sorted(folders)


def write_analysis(table: PaperTable, scale: str, results: str) -> None:
    """The value-norm profile behind the paper's motivating figure, for the experiment's first model."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvbench.resources import CONFIG_DIR
    from papers.value_norms import write_value_norms

    model = table.smoke["model"].get(table.base.get("model"), "tiny") if scale == "smoke" else None
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        experiment = table.experiment + ("_smoke" if scale == "smoke" else "")
        cfg = compose("config", overrides=[f"experiment={experiment}", *([f"model={model}"] if model else [])])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    prefix = "smoke_" if scale == "smoke" else ""
    try:
        path = write_value_norms(model_cfg, table.analysis[f"{prefix}source"], table.analysis[f"{prefix}tokens"],
                                 results=results)
        print(f"wrote {path}")
    except KVBenchError as err:
        print(f"kvbench: warning: value-norm profile skipped: {err}", file=sys.stderr)


def reproduce(name: str, scale: str = "full", results: str = "results", run: bool = True,
              extra: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Path]]:
    from papers.claims import CLAIMS

    if scale not in SCALES:
        raise KVBenchError(f"SCALE={scale} is not one of: {', '.join(SCALES)}")
    if name not in PAPER_TABLES and not (scale == "cpu" and name in CLAIMS):
        claims_only = sorted(set(CLAIMS) - set(PAPER_TABLES))
        raise KVBenchError(f"no paper table for experiment '{name}'; choose one of: {', '.join(PAPER_TABLES)} "
                           f"(claims at SCALE=cpu only: {', '.join(claims_only)})")
    # claims with no paper numbers to compare (the needle heatmaps): the experiment's sweep and its claim rows
    table = PAPER_TABLES.get(name) or PaperTable(experiment=name, csv="", index=[], base={}, rows={}, columns={})
    if scale == "smoke" and table.smoke is None:
        raise KVBenchError(f"{name} has no smoke scale (its methods need a real model); run it with SCALE=full")
    if scale == "cpu":  # the paper's claims on SmolLM2: one row each, no paper layout
        from papers.claims import write_claims

        if run:
            run_sweeps(table, scale, results, extra or [])
        return write_claims(name, collect(sweep_folders(table, scale, results, extra or [])), Path(results) / "tables")
    if run:
        run_sweeps(table, scale, results, extra or [])
        if table.analysis:
            write_analysis(table, scale, results)
    frame = compare(table, collect(find_runs(results)), scale)
    note = SMOKE_NOTE if scale == "smoke" else (f"{name}: paper (papers/reported/{table.csv}), ours, Δ = ours − paper; where our runs have "
                                                      "95% intervals, ± is half ours and 'in CI' says whether |Δ| <= ±.")
    note += f" {table.layout}" if table.layout else ""
    out_name = name + ("_smoke" if scale == "smoke" else "")
    return frame, write(frame, Path(results) / "tables", out_name, note)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="A paper's table with kvbench's numbers and the difference.")
    parser.add_argument("experiment", nargs="?", default="", help=f"one of: {', '.join(PAPER_TABLES)}")
    parser.add_argument("--scale", default="full", help="full (the paper's setting) | smoke (tiny model, CPU) | cpu (SmolLM2-135M, claim rows)")
    parser.add_argument("--results", default="results")
    parser.add_argument("--no-run", dest="run", action="store_false", help="only rebuild the table from runs on disk")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the sweep (e.g. task.limit=20)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        frame, paths = reproduce(args.experiment, args.scale or "full", args.results, args.run, args.overrides)
    except KVBenchError as err:
        return error_exit(err)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
