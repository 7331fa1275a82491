"""SimLayerKV — Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction",
arXiv:2410.13846 (github.com/sail-sg/SimLayerKV); reference code: NVIDIA kvpress `SimLayerKVPress`
(kvpress/presses/simlayerkv_press.py, commit 8bb29b9).

Some layers are "lazy": their last queries look almost only at the first tokens and the most recent
ones. A lazy layer keeps just those (a streaming layer); every other layer keeps its whole cache. For a
prompt of L tokens, with a the attention of the last `n_last` queries averaged over them and over the
query heads (the last n_last keys left out, as kvpress's window attention drops them):

    score = sum_{j < n_initial} a_j + sum_{L - n_last - n_recent <= j < L - n_last} a_j
    lazy  = score > lazy_threshold
    a lazy layer keeps positions j < n_initial and j >= L - (n_recent - n_last)

What kvbench's budget means here (kvpress has none: n_recent fixes the lazy layers' size and the memory
follows): C is what a lazy layer keeps, n_initial sinks + C - n_initial recent tokens, so
n_recent = C - n_initial + n_last (kvpress's defaults n_recent 1024, n_initial 4, n_last 1 are C = 1027).
A prompt of at most n_initial + n_recent + n_last tokens is left alone (kvpress: "no compression").

Carried over from kvpress: the window attention of the last n_last queries (softmax over the causal keys),
its mean over batch, heads and queries, the strict `>`, the kept tokens, laziness decided per layer at
the prompt, threshold 1.0 meaning never lazy. The paper's thresholds by family (kvpress's docstring):
Llama 3 0.9, Llama 2 0.65, Mistral 0.8, Qwen 0.85 (`configs/method/simlayerkv.yaml`: 0.9).

Differences: the attention is float32 (kvpress casts the softmax back to the model dtype before the
mean); the decision is per sequence (kvpress averages over the batch; the same at batch 1, and kvbench's
batched decoding runs each sequence's attention alone). `stage: decode` keeps a lazy layer at C while
generating (the oldest token after the sinks goes: the paper's streaming layers); kvpress compresses the
prompt only and a lazy layer then grows. On a model with sliding-window layers, those layers are judged
on their window like the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method


@dataclass
class SimLayerKV(Method):
    stage: str = "prefill"
    lazy_threshold: float = 0.9  # a layer is lazy when the last queries' attention on sinks + recent exceeds it
    n_last: int = 1  # last queries the attention is measured for (kvpress: 1, "to match SLKV-decode")
    n_initial: int = 4  # sinks a lazy layer keeps

    name: ClassVar[str] = "simlayerkv"
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = "attention of the last `n_last` queries; per-layer budgets (lazy layers only)"
    reference: ClassVar[str] = "arXiv:2410.13846; sail-sg/SimLayerKV; kvpress SimLayerKVPress"
    adapts: ClassVar[bool] = False  # recency inside a lazy layer: no scores

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.lazy_threshold <= 1:
            raise KVBenchError(f"method.lazy_threshold={self.lazy_threshold} must be in [0, 1]")
        if self.n_last < 1 or self.n_initial < 0:
            raise KVBenchError("method.n_last must be >= 1 and method.n_initial >= 0")
        if self.sinks:
            raise KVBenchError("simlayerkv keeps method.n_initial sinks in its lazy layers: leave method.sinks=0")

    def split(self, budget: int) -> tuple[int, int]:
        sinks = min(self.n_initial, budget)
        return sinks, budget - sinks

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest(window=self.n_last) if phase == "prefill" else StatsRequest()

    def layer_allocations(self, layers, stats, allocation, shape):
        """This layer's: lazy, the allocation (n_initial sinks + the most recent); otherwise no limit."""
        return [None] * (len(layers) - 1) + [self._allocation(stats, allocation)]

    def _allocation(self, stats, allocation):
        budget, sinks, _ = allocation
        if budget is None or self.lazy_threshold == 1.0:
            return None, 0, 0
        n_recent = budget - sinks + self.n_last
        n = stats.window.shape[-1]
        if n <= sinks + n_recent + self.n_last:
            return None, 0, 0
        seen = stats.window.mean(dim=1)[:, : n - self.n_last]  # over heads; without the last n_last keys
        score = seen[:, :sinks].sum(dim=-1) + seen[:, -n_recent:].sum(dim=-1)
        return allocation if score.mean().item() > self.lazy_threshold else (None, 0, 0)
