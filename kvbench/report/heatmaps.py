"""Needle-in-a-haystack heatmaps (matplotlib, the `plots` extra): x = context length, y = needle depth %,
colour = score, as KVCache-Factory's `scripts/scripts_needle/visualize.py` draws them (its red-yellow-green
map from 0 to 100, depth 0 at the top). From each finished `niah` run's scores.json `grid`:

    results/plots/niah/<model>_<task>_<method>_<budget>.png    one run
    results/plots/niah/<model>_<task>_methods.png              every method and budget side by side

`kvbench table` and `kvbench report` write them (python -m kvbench.report.heatmaps --results DIR alone).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from kvbench.report.plots import _plt, save_png
from kvbench.report.runs import find_runs, natural_key

COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]  # visualize.py's LinearSegmentedColormap



def niah_runs(folders) -> list[dict]:
    """{model, task, method, budget, grid, full} of every run folder whose scores.json holds a needle grid."""
    out = []
    for folder in folders:
        scores = json.loads((Path(folder) / "scores.json").read_text())
        if not scores.get("grid"):
            continue
        cfg = yaml.safe_load((Path(folder) / "config.yaml").read_text()) or {}
        out.append({"model": scores.get("model"), "task": scores.get("task"), "method": scores.get("method"),
                    "budget": scores.get("budget"), "grid": scores["grid"], "score": next(iter(scores["scores"].values())),
                    "full": (cfg.get("method") or {}).get("name") == "full", "run": str(folder)})
    return out


def _matrix(grid: dict) -> tuple[list[str], list[str], list[list[float]]]:
    lengths = sorted(grid, key=float)
    depths = sorted({d for row in grid.values() for d in row}, key=float)
    return lengths, depths, [[grid[n].get(d, float("nan")) for n in lengths] for d in depths]


def _panel(ax, run: dict, cmap, show_y: bool = True):
    lengths, depths, values = _matrix(run["grid"])
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [f"{int(float(n)):,}" for n in lengths], rotation=45, fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{float(d):g}" for d in depths] if show_y else [], fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("context length (tokens)", fontsize=8)
    if show_y:
        ax.set_ylabel("needle depth (%)", fontsize=8)
    ax.set_title(f"{run['method']}\n@ {run['budget']} (mean {run['score']:.1f})", fontsize=8)
    return image


def _name(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", str(p)) for p in parts)


def write_heatmaps(runs: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per run and one side-by-side PNG per (model, task); [] without matplotlib or runs."""
    if not runs:
        return []
    try:
        plt = _plt()
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        return []
    cmap = LinearSegmentedColormap.from_list("niah", COLOURS)
    out_dir, written = Path(out_dir), []
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(run["grid"]), 3.2))
        fig.colorbar(_panel(ax, run, cmap), ax=ax, label="score")
        ax.set_title(f"{run['model']} · {run['method']} @ {run['budget']}  (mean {run['score']:.1f})", fontsize=8)
        written.append(save_png(fig, out_dir / f"{_name(run['model'], run['task'], run['method'], run['budget'])}.png"))
        groups.setdefault((run["model"], run["task"]), []).append(run)
    for (model, task), members in groups.items():
        # the full cache first, then methods by name and budgets in numeric order
        members = sorted(members, key=lambda r: (not r["full"], natural_key(r["method"]), natural_key(r["budget"])))
        width = 1.0 + 0.45 * max(len(r["grid"]) for r in members)
        fig, axes = plt.subplots(1, len(members), figsize=(width * len(members) + 1, 3.4), squeeze=False)
        for k, (ax, run) in enumerate(zip(axes[0], members)):
            image = _panel(ax, run, cmap, show_y=k == 0)
        fig.colorbar(image, ax=list(axes[0]), label="score", fraction=0.02)
        fig.suptitle(f"{model} · {task}: needle in a haystack", fontsize=9, y=1.08)
        written.append(save_png(fig, out_dir / f"{_name(model, task, 'methods')}.png"))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Needle-in-a-haystack heatmaps of every finished niah run.")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    written = write_heatmaps(niah_runs(find_runs(args.results)), Path(args.results) / "plots" / "niah")
    print(f"wrote {', '.join(map(str, written))}" if written else "no niah runs (or matplotlib missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
