"""KVzip — Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
arXiv:2505.23416 (github.com/snu-mllab/KVzip); reference code: NVIDIA kvpress `KVzipPress`
(kvpress/presses/kvzip_press.py, commit 8bb29b9).

A KV pair matters as much as the model needs it to repeat the context. After the prompt is in the cache,
the model is asked to reproduce it, one chunk of `chunk_size` tokens at a time: each pass forwards

    first chunk:   "\\n\\nRepeat the previous context exactly."                           + suffix + chunk
    later chunks:  "\\n\\nRepeat the part of the previous context exactly, starting with" + the previous
                   chunk's last `prev_postfix` tokens                                   + suffix + chunk

on top of the whole cache (suffix: the chat template between the user's message and the answer, "\\n"
without one). In every layer, with q the pass's queries (after RoPE) and K the keys of the first
min(sinks, start) tokens, of the chunk [start, end) in the cache and of the pass itself (causal),

    A     = softmax(q K^T / sqrt(head_dim))                         over those keys only
    s_j   = max over the queries of the pass and the query heads of a KV group of A_ij,  j in the chunk

The chat template's opening (`prefix` tokens, never repeated) scores 1 on its first `sinks` tokens and 0
on the rest. The kept set is a global top-k over every layer and KV head (`layerwise: false`,
the reference's default; per-head budgets in a ragged store), or per layer over its heads (`layerwise:
true`). kvbench's budget C is, as for every method, the mean tokens kept per KV head per layer: the cut
keeps C x heads x layers tokens, the reference's `int(numel x compression_ratio)` pruned with
compression_ratio = 1 - C / L.

Cost: the reconstruction forwards about L + (chunks x ~30) tokens on top of the prompt's cache (kvpress:
2-3x the prefill), and the whole uncompressed cache is held until the last pass (no per-layer cut
during the prompt); the scores hold 4 bytes per token per KV head per layer. The engine runs the passes
(`Session`) from token ids a tokenizer gives (`RepeatPrompts`; `kvbench.models.chat.repeat_prompts`).

Carried over from kvpress: the two prompts, the suffix from the chat template's split around a dummy
message, the chunks of 2048 context tokens after the prefix, the 8-token postfix, sinks = min(4, start),
the 1/sqrt(head_dim) scaling (no softcap), the softmax over the subsampled keys only, max over queries and
group, sinks scored 1 and the prefix 0, `layerwise`, the global top-k. Differences: the softmax is float32
(kvpress: the model dtype; the products are in the model dtype in both) and computed in blocks of queries; ties keep the newer token,
then the lower layer and head (kvpress: torch.topk's order); batches of several sequences (kvpress: batch
1); kvpress masks the pruned keys (memory not freed), kvbench stores each head's kept tokens (ragged);
KVzip+ normalisation (`kvzip_plus_normalization`) is not offered: it needs the attention's input hidden
states, which the attention function does not see.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.types import RepeatPrompts, StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
# float32 logits held at once while scoring a pass: about half the layer's KV bytes, within these bounds (the
# engine's rule for its attention statistics)
MIN_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS = 2**22, 2**26


@dataclass
class KVzip(Method):
    sinks: int = 4  # the reference's n_sink
    chunk_size: int = 2048
    prev_postfix: int = 8
    layerwise: bool = False  # true: every layer keeps C per head on average (kvpress `layerwise`)
    first_prompt: str = FIRST_PROMPT
    later_prompt: str = LATER_PROMPT

    name: ClassVar[str] = "kvzip"
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = ("reconstruction passes (~1 more prefill over the full cache); the whole prompt's "
                           "KV held until its last pass; ragged store")
    reference: ClassVar[str] = "arXiv:2505.23416; kvpress KVzipPress"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    adapts: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_size < 1 or self.prev_postfix < 0:
            raise KVBenchError(f"method.chunk_size={self.chunk_size} must be >= 1 and method.prev_postfix="
                               f"{self.prev_postfix} >= 0")
        if (self.gqa != "kv" or self.positions != "original" or self.chunk or self.critical
                or self.layers != "uniform" or self.key_channels):
            raise KVBenchError("kvzip sets its own per-head budgets in a ragged store: use method.gqa=kv, "
                               "method.positions=original and no chunk/critical/layers/key_channels setting")

    @property
    def per_head(self) -> bool:
        return True

    def statistics(self, phase: str) -> StatsRequest:
        # a reconstruction pass: every query of the pass, after RoPE (the prompt itself needs no statistic)
        return StatsRequest(window_queries=sys.maxsize) if phase == "reconstruct" else StatsRequest()

    def reconstruction_passes(self, context: torch.Tensor, prompts: RepeatPrompts) -> list:
        """The passes over the prompt `context` (batch, L): (start, end, ids (batch, q)), the chunk [start, end)
        of the prompt that `ids` repeats (the reference's `prepare`)."""
        batch = context.shape[0]
        device = context.device
        first, later, suffix = (x.to(device).expand(batch, -1) for x in (prompts.first, prompts.later, prompts.suffix))
        passes, previous = [], None
        for start in range(prompts.prefix, context.shape[1], self.chunk_size):
            end = min(start + self.chunk_size, context.shape[1])
            chunk = context[:, start:end]
            tail = None if previous is None else previous[:, previous.shape[1] - self.prev_postfix :]
            ask = first if previous is None else torch.cat([later, tail], dim=1)
            passes.append((start, end, torch.cat([ask, suffix, chunk], dim=1)))
            previous = chunk
        return passes

    def reconstruction_scores(self, layer, queries: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        """The chunk's scores (batch, kv_heads, end - start) from one pass's `queries` (batch, query_heads, q,
        head_dim, after RoPE) on the layer's keys (the prompt's, then the pass's q)."""
        start, end = span
        batch, query_heads, q, dim = queries.shape
        length = layer.length
        sink = min(self.sinks, start)
        keys = torch.cat([layer.part("keys", 0, sink), layer.part("keys", start, end - start),
                          layer.part("keys", length - q, q)], dim=2)
        kv_heads = keys.shape[1]
        grouped = queries.reshape(batch, kv_heads, query_heads // kv_heads, q, dim)
        n = keys.shape[2]
        scores = torch.full((batch, kv_heads, end - start), float("-inf"), device=keys.device)
        layer_kv_bytes = 2 * batch * kv_heads * length * dim * keys.element_size()
        elements = min(MAX_BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, layer_kv_bytes // 8))
        block = max(1, elements // (batch * query_heads * n))
        for first in range(0, q, block):
            last = min(first + block, q)
            # the products in the model's dtype, as kvpress; the softmax in float32
            logits = torch.einsum("bhgqd,bhkd->bhgqk", grouped[:, :, :, first:last], keys).float()
            logits.mul_(1 / math.sqrt(dim))
            # query i of the pass sees the pass's keys up to itself (the keys before them all)
            own = torch.arange(first, last, device=keys.device)[:, None] < torch.arange(q, device=keys.device)
            logits[..., n - q :].masked_fill_(own, float("-inf"))
            probs = logits.softmax(dim=-1)[..., sink : sink + end - start]
            scores = torch.maximum(scores, probs.amax(dim=(2, 3)))
        return scores

    def reconstructed_budgets(self, scores: list[torch.Tensor], prefix: int, budget: int) -> list[torch.Tensor]:
        """Tokens each KV head of each layer keeps, (batch, kv_heads) per layer, from every layer's scores
        (batch, kv_heads, L) from `prefix` on, which it first completes: the first `sinks` tokens of the prefix
        score 1, the rest of it 0 (the reference's score_val). The top C x heads x layers over all of them (or per layer)."""
        for s in scores:  # the reference sets the sinks first; the chunks, from `prefix` on, overwrite them
            s[..., :prefix] = 0.0
            s[..., : min(self.sinks, prefix)] = 1.0
        batch, heads, n = scores[0].shape
        groups = [[s] for s in scores] if self.layerwise else [scores]
        budgets = []
        for group in groups:
            flat = torch.cat([s.flip(-1) for s in group], dim=1).reshape(batch, -1)  # newest first in each head
            order = flat.argsort(dim=-1, descending=True, stable=True)[:, : budget * heads * len(group)]
            counts = torch.zeros(batch, heads * len(group), dtype=torch.long, device=flat.device)
            counts.scatter_add_(1, order // n, torch.ones_like(order))
            budgets += list(counts.view(batch, len(group), heads).unbind(1))
        return budgets
