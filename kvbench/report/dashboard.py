"""Create the kvbench W&B workspace: runs grouped by method, budget against score (needs W&B online).

    pip install -e '.[dashboards]'; wandb login
    python -m kvbench.report.dashboard --entity my-team --project kvbench
    python -m kvbench.report.dashboard --entity my-team --project kvbench --experiment weightedkv_ppl

The panels read the keys every kvbench run logs (kvbench.runner.tracking.DASHBOARD_CONFIG and
DASHBOARD_METRICS): config `method_name`, `budget_tokens`, `task_name`, ...; summary `score/avg`,
`kv/ratio`, ... Runs are grouped by `method_name`; `--experiment` keeps one experiment's runs.
"""

import argparse
import os
import sys

from kvbench.runner.tracking import DASHBOARD_CONFIG, DASHBOARD_METRICS


def build_workspace(entity: str, project: str, experiment: str | None = None):
    """The workspace object (nothing is sent until `.save()`)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    score = wr.SummaryMetric("score/avg")
    panels = [
        wr.ScatterPlot(title="score vs budget (tokens)", x=wr.Config("budget_tokens"), y=score, log_x=True),
        wr.ScatterPlot(title="score vs KV kept (ratio)", x=wr.SummaryMetric("kv/ratio"), y=score),
        wr.ScatterPlot(title="throughput vs budget", x=wr.Config("budget_tokens"), y=wr.SummaryMetric("time/tokens_per_s")),
        wr.BarPlot(title="score by method", metrics=[score], groupby="method_name"),
    ]
    filters = [expr.Config("experiment_name") == experiment] if experiment else []
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"kvbench: {experiment or 'all runs'} by method",
        sections=[ws.Section(name="budget vs score", panels=panels, is_open=True)],
        runset_settings=ws.RunsetSettings(groupby=[expr.Config("method_name")], filters=filters),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B user or team")
    parser.add_argument("--project", default="kvbench")
    parser.add_argument("--experiment", default=None, help="only this experiment_name's runs")
    args = parser.parse_args(argv)
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled") or not args.entity:
        problem = f"WANDB_MODE={mode}" if mode in ("offline", "disabled") else "no --entity (or WANDB_ENTITY)"
        print(f"kvbench: error: the dashboard is created on wandb.ai and needs W&B online ({problem}): "
              "`wandb login`, then WANDB_MODE=online python -m kvbench.report.dashboard --entity NAME", file=sys.stderr)
        return 2
    try:
        workspace = build_workspace(args.entity, args.project, args.experiment)
    except ImportError:
        print("kvbench: error: the dashboard needs wandb-workspaces: pip install -e '.[dashboards]'", file=sys.stderr)
        return 2
    try:
        workspace.save()
    except Exception as err:  # noqa: BLE001 - network, login, permissions: one clear line
        print(f"kvbench: error: could not save the workspace to {args.entity}/{args.project}: "
              f"{type(err).__name__}: {err}; check `wandb login` and the entity", file=sys.stderr)
        return 2
    print(f"workspace: {workspace.url}")
    print(f"panels use config {', '.join(DASHBOARD_CONFIG)} and summary {', '.join(DASHBOARD_METRICS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
