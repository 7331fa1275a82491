"""A run's scores.json: the task's metric over its records, per sub-task, with their average, n and 95% intervals.

Written by the runner when an unsharded run finishes, and by `kvbench merge` when a sharded one does.
"""

from __future__ import annotations

from kvbench.tasks.stats import intervals


def average(task, scores: dict) -> float | None:
    """The run's one number: the task's `headline` column where its columns overlap (LongBench v2: overall),
    else the mean of its sub-task scores."""
    headline = getattr(task, "headline", None)
    if headline:
        return scores.get(headline)
    return round(sum(scores.values()) / len(scores), 2) if scores else None


def summarize(task, labels: dict, records: list[dict], stored_cfg: dict | None = None) -> dict:
    """scores.json of a run: the task's scores per sub-task, their average and the sample count, with the
    run id and hashed settings of `stored_cfg` (the run folder's config.yaml)."""
    subtask_scores = task.score(records)
    stored_cfg = stored_cfg or {}
    return {
        **labels,
        "run_id": stored_cfg.get("run_id"),
        "scores": subtask_scores,
        "average": average(task, subtask_scores),
        "n": len(records),
        "intervals": intervals(task, records),  # 95% bootstrap per sub-task (kvbench.tasks.stats)
        **(task.score_details(records) if hasattr(task, "score_details") else {}),
        "settings": stored_cfg.get("run_settings"),
    }
