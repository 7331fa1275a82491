"""One run split over N processes: `run.num_shards=N run.shard=i` (defaults 1 and 0).

Shard i evaluates samples i, i+N, i+2N, ... of the task's fixed sample order (after `task.limit`),
so the shards of a rerun hold the same samples. Its records go to `predictions.<i>-of-<N>.jsonl`
in the run folder and its meta to `meta.<i>-of-<N>.json`; `kvbench.runner.merge` joins them when the
last shard is done. Sharding never changes what a run computes, so it is not part of the run's
identity (folder name, run id): an unsharded run and its shards share one folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import KVBenchError


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def from_config(cls, cfg: dict) -> Shard:
        run = cfg.get("run") or {}
        index, count = run.get("shard", 0), run.get("num_shards", 1)
        index, count = 0 if index is None else index, 1 if count is None else count
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise KVBenchError(f"run.num_shards={count}: the number of shards must be an integer >= 1")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise KVBenchError(f"run.shard={index}: a shard index must be an integer in 0..{count - 1} (run.num_shards={count})")
        return cls(index, count)

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def suffix(self) -> str:
        return f"{self.index}-of-{self.count}"

    @property
    def predictions_name(self) -> str:
        return f"predictions.{self.suffix}.jsonl" if self.sharded else "predictions.jsonl"

    @property
    def meta_name(self) -> str:
        return f"meta.{self.suffix}.json"

    @property
    def lock_name(self) -> str:
        return f".lock.{self.suffix}" if self.sharded else ".lock"

    @property
    def label(self) -> str:
        return f" [shard {self.suffix}]" if self.sharded else ""

    def select(self, samples: list) -> list:
        return samples[self.index :: self.count]


def interleave(parts: list[list]) -> list:
    """The inverse of `Shard(i, len(parts)).select`: position p comes from part p % N, index p // N."""
    total = sum(len(p) for p in parts)
    n = len(parts)
    return [parts[p % n][p // n] for p in range(total)]
