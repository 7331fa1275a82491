"""Plots from result tables (matplotlib, the `plots` extra). Reads only results/, writes PNGs.

    python -m kvbench.plots --name demo        # results/plots/demo_budget_vs_score.png from every run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from kvbench.tables import _budget_order, collect, find_runs


def budget_vs_score(long: pd.DataFrame, out: str | Path, title: str = "") -> Path | None:
    """One panel per sub-task: score against budget (tokens) per method; full cache as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if long.empty:
        return None
    subtasks = list(dict.fromkeys(long["subtask"]))
    fig, axes = plt.subplots(1, len(subtasks), figsize=(4.2 * len(subtasks), 3.4), squeeze=False)
    for ax, subtask in zip(axes[0], subtasks):
        rows = long[long["subtask"] == subtask]
        for (model, method), group in rows.groupby(["model", "method"], sort=False):
            label = method if rows["model"].nunique() == 1 else f"{model}/{method}"
            if method == "full":
                for value in group["score"]:
                    ax.axhline(value, color="black", linestyle="--", linewidth=1, label=label)
                continue
            group = group[group["budget_tokens"].notna()]
            group = group.assign(order=group["budget"].map(_budget_order)).sort_values("order")
            ax.plot(group["budget_tokens"].astype(float), group["score"], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens per head)")
        ax.set_ylabel("perplexity (lower is better)" if str(subtask).startswith("ppl_") else "score")
        ax.set_title(subtask)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Budget-vs-score plot from kvbench run folders.")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="all")
    args = parser.parse_args(argv)
    out = budget_vs_score(collect(find_runs(args.results)), Path(args.results) / "plots" / f"{args.name}_budget_vs_score.png")
    print(f"wrote {out}" if out else "nothing plotted (no runs, or matplotlib missing: pip install -e '.[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
