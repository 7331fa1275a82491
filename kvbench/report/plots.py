"""Plots from run folders (matplotlib, the `plots` extra). Reads only results/, writes PNGs.

    python -m kvbench.report.plots --name demo        # results/plots/demo_budget_vs_score.png from every run

One style (colour, marker, line style) and one legend entry per method over the whole figure, the same
method styled alike in every figure; the legend outside the axes; error bars from the runs' 95% intervals;
methods with equal scores nudged apart sideways so no curve hides another. A full cache (any tag) is a
horizontal reference line, not a method; panels and budgets in numeric order (w32, w64, w128).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.report.runs import collect, find_runs, natural_key
from kvbench.runner.folder import disk_full

REFERENCE_STYLES = ("--", ":", "-.")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_label(row) -> str:
    """What a line is called: its method label, and the settings that tell it from a same-named run."""
    return f"{row['method']} [{row['settings']}]" if row.get("settings") else str(row["method"])


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", "-.", ":")


STYLE_COUNT = 60  # colour index period 20 (tab20) and marker / line style period 12: 60 distinct styles


def method_styles(labels) -> dict[str, dict]:
    """A colour, hollow marker and line style per label, each label's own in every figure: a registered
    method (or a run of it with a settings suffix, when the plain method is not drawn) takes its registry
    place; any other label a place from a hash of its text, the next free one if another label of this
    figure holds it (or, up to 20 labels, its colour). No two labels of a figure share a style (up to STYLE_COUNT
    labels), nor a colour (up to 20)."""
    import zlib

    from kvbench.methods import REGISTRY

    labels = set(labels)
    known = [name for name in REGISTRY if name != "full"]
    colour = lambda i: (2 * i) % 20 + (i // 10) % 2  # noqa: E731  (a tab20 index)
    places: dict[str, int] = {label: known.index(label) for label in labels if label in known}
    for label in sorted(labels - set(places), key=natural_key):
        base = label.split(" [")[0]
        free = STYLE_COUNT - len(known)
        i = known.index(base) if base in known else len(known) + zlib.crc32(label.encode()) % free
        # held by another label of this figure, or (up to 20 labels) its colour is: the next hashed place
        for _ in range(free):  # more labels than styles: the last one tried is shared
            if i not in places.values() and (len(places) >= 20 or colour(i) not in {colour(j) for j in places.values()}):
                break
            i = len(known) + (max(i - len(known), -1) + 1) % free
        places[label] = i
    cmap = _plt().get_cmap("tab20")
    return {label: {"color": cmap(colour(i)), "marker": MARKERS[i % len(MARKERS)],
                    "linestyle": LINESTYLES[(i // 3) % len(LINESTYLES)]}
            for label, i in sorted(places.items(), key=lambda item: natural_key(item[0]))}


def method_colours(labels) -> dict[str, tuple]:
    """The colour of each label's style (`method_styles`)."""
    return {label: style["color"] for label, style in method_styles(labels).items()}


def x_axis(compressed: pd.DataFrame) -> tuple[str, str]:
    """(column, axis label): the budget in tokens, else the ratio, else the prompt tokens kept (meta.json)."""
    if compressed["budget_tokens"].notna().all():
        return "budget_tokens", "KV budget (tokens per head)"
    if compressed["budget_ratio"].notna().all():
        return "budget_ratio", "KV budget (fraction of the prompt)"
    return "kept_per_head", "prompt tokens kept per head (mean, meta.json)"


def budget_vs_score_figure(long: pd.DataFrame, title: str = ""):
    """The matplotlib figure: one panel per (model, sub-task), a line per method, full cache as reference lines."""
    if long.empty:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter
    from matplotlib.transforms import offset_copy

    long = long.assign(series=long.apply(series_label, axis=1))
    refs, compressed = long[long["reference"]], long[~long["reference"]]
    x, xlabel = x_axis(compressed) if not compressed.empty else ("budget_tokens", "KV budget (tokens per head)")
    styles = method_styles(compressed["series"])
    ref_styles = {s: REFERENCE_STYLES[i % 3] for i, s in enumerate(sorted(set(refs["series"]), key=natural_key))}
    several_models = long["model"].nunique() > 1
    panels = list(dict.fromkeys(zip(long["family"], long["subtask"], long["model"])))  # LongBench: the papers' order
    panels = [(m, s) for f, s, m in sorted(panels, key=lambda p: (p[0], natural_key(p[1]) if p[0] == "ppl" else (), p[2]))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (model, subtask) in zip(axes[0], panels):
        panel = long[(long["model"] == model) & (long["subtask"] == subtask)]
        if x == "budget_tokens" or x == "kept_per_head":
            ax.set_xscale("log", base=2)  # before the shifted lines are drawn: their transform is built on it
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 64, not 2^6
        for series, group in panel[panel["reference"]].groupby("series"):
            for _, ref in group.iterrows():
                ax.axhline(ref["score"], color="black", linestyle=ref_styles[series], linewidth=1, label=series)
                if pd.notna(ref["low"]) and pd.notna(ref["high"]):  # its 95% interval as a band
                    ax.axhspan(ref["low"], ref["high"], color="black", alpha=0.07, linewidth=0)
        drawn = sorted(set(panel.loc[~panel["reference"], "series"]), key=natural_key)
        for k, series in enumerate(drawn):
            group = panel[(panel["series"] == series) & panel[x].notna()].sort_values(x)
            # equal scores stay visible: each method drawn a few points sideways by its rank in the panel
            # (the data are unchanged), with hollow markers of its own shape and a line style of its own
            shift = offset_copy(ax.transData, fig=fig, x=2.5 * (k - (len(drawn) - 1) / 2), units="points")
            style = styles[series]
            xs, ys = group[x].astype(float), group["score"]
            ax.plot(xs, ys, color=style["color"], marker=style["marker"], linestyle=style["linestyle"],
                    markerfacecolor="none", markersize=6, linewidth=1.3, alpha=0.9, label=series, transform=shift)
            has_ci = group["low"].notna() & group["high"].notna()
            if has_ci.any():
                ax.errorbar(xs[has_ci], ys[has_ci], yerr=[(ys - group["low"])[has_ci].astype(float),
                                                          (group["high"] - ys)[has_ci].astype(float)],
                            fmt="none", ecolor=style["color"], elinewidth=0.8, capsize=2, alpha=0.8, transform=shift)
            # a shifted line does not move the axis limits by itself: its points and bars do, unshifted
            points = (np.concatenate([xs, xs[has_ci], xs[has_ci]]),
                      np.concatenate([ys, group["low"][has_ci], group["high"][has_ci]]))
            ax.update_datalim(np.column_stack(points).astype(float))
        ax.autoscale_view()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (lower is better)" if str(subtask).startswith("ppl_") else "score")
        ax.set_title(f"{model} / {subtask}" if several_models else str(subtask), fontsize=9)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="black", linestyle=style, label=s) for s, style in ref_styles.items()]
    handles += [Line2D([], [], color=st["color"], marker=st["marker"], linestyle=st["linestyle"],
                       markerfacecolor="none", label=s) for s, st in styles.items()]
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # outside the axes, right of the last panel (savefig's bbox_inches="tight" keeps it in the image)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
               title="bars: 95% interval", title_fontsize=7)
    return fig


def budget_vs_score(long: pd.DataFrame, out: str | Path, title: str = "") -> Path | None:
    """`budget_vs_score_figure` saved as a PNG; None when there is nothing to draw or no matplotlib."""
    try:
        fig = budget_vs_score_figure(long, title)
    except ImportError:
        return None
    if fig is None:
        return None
    return save_png(fig, Path(out))


def save_png(fig, out: Path) -> Path:
    """`fig` as a PNG at `out`, whole or not at all: a full disk leaves the previous figure, and one line
    naming the folder; the figure is closed."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_full(err, out.parent) or err from err
    finally:
        _plt().close(fig)
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
