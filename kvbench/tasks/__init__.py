"""Tasks: declarative settings (a dataclass built from `configs/task/*.yaml`) plus small metric functions.

A task provides
- `samples(tokenizer) -> list[dict]`: every sample, each with a stable `id`, in a fixed order;
- `evaluate(sample, generator) -> dict`: one JSON-able record (prediction, reference, score fields);
- for generation tasks, `prepare(sample, generator) -> Prompt` and `record(sample, prompt, generation,
  generator) -> dict` (evaluate is the two around `generator.run`): the runner then decodes several samples
  together (`run.batch_size`, kvbench.engine.batch) and writes each record as its sample finishes;
- `score(records) -> dict[str, float]`: scores in 0..100 per sub-task (one key for a single task);
  each record's own `score` is in [0, 1];
- optionally `score_details(records) -> dict`: more to store in scores.json (LongBench-E buckets);
  `units(records)`: how its 95% intervals resample (kvbench.tasks.stats; default one unit per sample);
  `label` (the run folder and score column when it is not `name`); `batch_size` with
  `evaluate_batch(samples, generator)` to evaluate several samples at once.
"""

from __future__ import annotations

from kvbench.errors import KVBenchError, build_dataclass
from kvbench.tasks.longbench import LongBench
from kvbench.tasks.longbench_v2 import LongBenchV2
from kvbench.tasks.niah import Niah
from kvbench.tasks.perplexity import Perplexity
from kvbench.tasks.reasoning import Reasoning
from kvbench.tasks.ruler import Ruler
from kvbench.tasks.synthetic import MultiKey, Passkey

REGISTRY = {cls.name: cls for cls in (Passkey, MultiKey, LongBench, Perplexity, Niah, Ruler, Reasoning, LongBenchV2)}


def build(cfg):
    params = dict(cfg)
    name = params.pop("name", None)
    if name not in REGISTRY:
        raise KVBenchError(f"unknown task '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    params.pop("limit", None)  # handled by the runner
    return build_dataclass(REGISTRY[name], params, f"task '{name}'")


def limit_samples(task, samples: list[dict], limit) -> list[dict]:
    """The first `limit` samples (`task.limit`); a task with sub-tasks (LongBench) limits each one."""
    if limit is None:
        return samples
    if int(limit) <= 0:
        raise KVBenchError(f"task.limit={limit} must be a number of samples > 0 (or null for all)")
    per_subtask = getattr(task, "limit_samples", None)
    return per_subtask(samples, int(limit)) if per_subtask else samples[: int(limit)]
