"""KeyDiff — Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
in Resource-Constrained Environments", arXiv:2504.15364; reference code: NVIDIA kvpress `KeyDiffPress`.

Keep the tokens whose keys differ most from the layer's average key direction, per KV head:

    a    = mean_j k_j / ||k_j||          (over the cached tokens; keys after RoPE, as stored)
    s_j  = -cos(k_j, a)
    keep = top C by s

No attention statistic (any attention kernel), query-agnostic, no sinks or recent window, computed in the
keys' dtype, all as kvpress's `KeyDiffPress`. The paper processes a prompt block by block, keeping C
tokens after each block (kvpress: `BlockPress(KeyDiffPress(...), block_size)`); kvbench scores the whole
prompt at once, as `KeyDiffPress` alone does. `stage: decode` re-ranks the cache (the anchor over the
tokens held) at every step, the decoding regime the paper targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from kvbench.methods.base import Method


def keydiff_scores(keys):
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


@dataclass
class KeyDiff(Method):
    name: ClassVar[str] = "keydiff"
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "key cosines to the mean key (no attention)"
    reference: ClassVar[str] = "arXiv:2504.15364; kvpress KeyDiffPress"

    def prefill_scores(self, layer, stats):
        return keydiff_scores(layer.view("keys"))

    def eviction_scores(self, layer):
        return keydiff_scores(layer.view("keys"))
