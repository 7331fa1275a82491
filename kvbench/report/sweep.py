"""The table and plot a Hydra multirun leaves when it ends (configs/config.yaml's `hydra.callbacks.sweep_table`)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from kvbench.report.plots import budget_vs_score
from kvbench.report.runs import collect
from kvbench.report.tables import build_tables, render


class SweepTableCallback(Callback):
    """After a multirun, write `results/tables/<table_name>_<family>.*` and a plot from the runs of that sweep.

    `table_name` is the experiment's name; an ad-hoc sweep is named after its sweep folder
    (`sweep-<date>-<time>`, as its W&B group), so one sweep never overwrites another's table."""

    def __init__(self, results_dir: str = "results", table_name: str | None = None):
        self.results_dir = results_dir
        self.table_name = table_name

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        listing = sweep_dir / "runs.txt"
        if not listing.exists():
            return
        name = self.table_name or f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"
        folders = sorted(set(listing.read_text().split()))
        tables = build_tables(self.results_dir, name, folders=folders)
        written = [str(paths["md"]) for _, paths in tables.values()]
        print(f"\n{render(tables)}\n\nwrote {', '.join(written)}")
        plot = Path(self.results_dir) / "plots" / f"{name}_budget_vs_score.png"
        if budget_vs_score(collect(folders), plot, title=name):
            print(f"wrote {plot}")
