"""The papers' figures, regenerated from results/ only (runs, analysis); PNGs go to results/plots/.

    python -m papers.plots                     # every figure there is data for
    notebooks/paper_plots.ipynb                   # the same functions, one cell per figure

- `score_vs_budget`: each run's average score against its budget, one line per method
  (HeadKV / KVCache-Factory, arXiv 2410.19258; the full cache as a dashed line);
- `ppl_vs_cache`: perplexity against cache size per method (WeightedKV, arXiv 2503.01330; StreamingLLM);
- `head_budget_heatmap`: prompt tokens kept per layer and KV head (HeadKV's per-head budgets), from the
  `kv_kept_tokens_per_layer_head` of each run's meta.json (the mean over its samples);
- `value_norms`: the per-layer distribution of value-vector ℓ1 norms with the attention-sink tokens
  marked (VATP's motivating figure, arXiv 2406.12335), from results/analysis/value_norms_*.json;
- `ppl_over_position`: perplexity over token position (StreamingLLM, arXiv 2309.17453), from the
  `nll_by_position` buckets in a perplexity run's scores.json;
- `niah_heatmaps`: needle-in-a-haystack heatmaps, context length x depth, every method side by side
  (KVCache-Factory's needle figure), from the `grid` of each niah run's scores.json.
Each returns the PNG's path, or None when results/ holds nothing to draw.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from kvbench.report.plots import _plt, budget_vs_score, method_colours
from kvbench.report.runs import collect, find_runs
from kvbench.report.tables import natural_key

HEADWISE_FIRST = ("headkv", "ada_snapkv", "pyramidkv")  # methods whose budgets differ per head or layer


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out


def _runs(results) -> pd.DataFrame:
    return collect(find_runs(results))


def score_vs_budget(results="results") -> Path | None:
    """Each run's average over its sub-tasks against its budget, per (model, task), a line per method."""
    long = _runs(results)
    long = long[long["family"] != "ppl"]
    if long.empty:
        return None
    keys = [c for c in long.columns if c not in ("subtask", "score")]
    avg = long.groupby(keys, dropna=False, sort=False)["score"].mean().reset_index()
    avg["subtask"] = avg["model"] + " / " + avg["task"] + " (avg)"
    return budget_vs_score(avg, Path(results) / "plots" / "paper_score_vs_budget.png", title="score vs budget")


def ppl_vs_cache(results="results") -> Path | None:
    """Perplexity against cache size (tokens), one panel per perplexity task, a line per method."""
    long = _runs(results)
    long = long[long["family"] == "ppl"]
    if long.empty:
        return None
    return budget_vs_score(long, Path(results) / "plots" / "paper_ppl_vs_cache.png", title="perplexity vs cache size")


def _kept_grid(folder: Path) -> list[list[float]] | None:
    """Mean over samples of the tokens kept per (layer, KV head), as the run's meta.json records it."""
    path = folder / "meta.json"
    return json.loads(path.read_text()).get("kv", {}).get("kv_kept_tokens_per_layer_head") if path.exists() else None


def head_budget_heatmap(results="results", max_runs: int = 4) -> Path | None:
    """Prompt tokens kept per layer (rows) and KV head (columns): HeadKV's runs first, else any compressed run.

    meta.json counts the prompt alone (the cache right after prefill), so decoded tokens never add to a head."""
    long = _runs(results).drop_duplicates("run")
    long = long[~long["reference"]]
    rank = long["method"].map(lambda m: next((i for i, p in enumerate(HEADWISE_FIRST) if m.startswith(p)), 9))
    picked = []
    for _, row in long.assign(rank=rank).sort_values(["rank", "budget_tokens"]).iterrows():
        grid = _kept_grid(Path(row["run"]))
        if grid:
            picked.append((f"{row['model']}/{row['method']}/{row['budget']}", grid))
        if len(picked) == max_runs:
            break
    if not picked:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(picked), figsize=(3.6 * len(picked), 3.4), squeeze=False)
    for ax, (title, grid) in zip(axes[0], picked):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(grid[0])))
        ax.set_yticks(range(len(grid)))
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=8)
        fig.colorbar(image, ax=ax, label="prompt tokens kept (mean over samples)")
    fig.tight_layout()
    return _save(fig, Path(results) / "plots" / "paper_head_budgets.png")


def value_norms(results="results") -> Path | None:
    """Per layer, the distribution of value ℓ1 norms (box) and the sink tokens' norms (red x)."""
    files = sorted((Path(results) / "analysis").glob("value_norms_*.json"))
    if not files:
        return None
    most_layers = max(len(json.loads(path.read_text())["layers"]) for path in files)
    plt = _plt()
    fig, axes = plt.subplots(len(files), 1, figsize=(max(5, 0.35 * most_layers), 3.2 * len(files)), squeeze=False)
    for ax, path in zip(axes[:, 0], files):
        data = json.loads(path.read_text())
        layers = data["layers"]
        ax.boxplot([layer["value_norm_l1"] for layer in layers], showfliers=False)
        for i, layer in enumerate(layers, start=1):
            sinks = [layer["value_norm_l1"][p] for p in layer["sink_positions"]]
            ax.scatter([i] * len(sinks), sinks, marker="x", color="red", zorder=3,
                       label="most-attended (sink) tokens" if i == 1 else None)
        ax.set_xticks(range(1, len(layers) + 1), [str(layer["layer"]) for layer in layers], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("value ℓ1 norm")
        ax.set_title(f"{data['model']}: {data['tokens']} tokens of {data['source']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(results) / "plots" / "paper_value_norms.png")


def ppl_over_position(results="results") -> Path | None:
    """exp(mean NLL) per bucket of token positions, one panel per (model, task), a line per method and budget."""
    curves = {}
    for folder in find_runs(results):
        scores = json.loads((folder / "scores.json").read_text())
        buckets = scores.get("nll_by_position")
        if buckets and buckets["start"]:
            panel = (scores["model"], scores["task"])
            curves.setdefault(panel, []).append((f"{scores['method']} {scores['budget']}", buckets))
    if not curves:
        return None
    plt = _plt()
    colours = method_colours(label for lines in curves.values() for label, _ in lines)  # the same in every panel
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.4), squeeze=False)
    for ax, ((model, task), lines) in zip(axes[0], sorted(curves.items(), key=lambda c: natural_key(c[0][1]))):
        for label, buckets in sorted(lines, key=lambda line: natural_key(line[0])):
            ax.plot(buckets["start"], [math.exp(x) for x in buckets["mean_nll"]], label=label, linewidth=1,
                    color=colours[label])
        ax.set_yscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{model} / {task}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, Path(results) / "plots" / "paper_ppl_over_position.png")


def niah_heatmaps(results="results") -> Path | None:
    """Needle-in-a-haystack heatmaps (context length x depth, KVCache-Factory's figure): every run's under
    results/plots/niah/ (kvbench.report.heatmaps), and the first model's methods side by side here."""
    import shutil

    from kvbench.report.heatmaps import niah_runs, write_heatmaps

    written = write_heatmaps(niah_runs(find_runs(results)), Path(results) / "plots" / "niah")
    side_by_side = next((p for p in written if p.name.endswith("_methods.png")), None)
    if side_by_side is None:
        return None
    return Path(shutil.copyfile(side_by_side, Path(results) / "plots" / "paper_niah_heatmaps.png"))


FIGURES = (score_vs_budget, ppl_vs_cache, head_budget_heatmap, value_norms, ppl_over_position, niah_heatmaps)


def make_all(results="results") -> dict[str, Path | None]:
    """Every figure; the value is None where results/ has no data for it."""
    return {figure.__name__: figure(results) for figure in FIGURES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The papers' figures from a results folder.")
    parser.add_argument("--results", default="results", help="the results folder (runs/, analysis/)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("kvbench: error: plots need matplotlib: pip install -e '.[plots]'", file=sys.stderr)
        return 2
    for name, path in make_all(args.results).items():
        print(f"{name}: {path if path else 'no data under ' + args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
