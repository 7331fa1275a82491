"""Random — the floor every compression method must beat; reference code: NVIDIA kvpress `RandomPress`.

Every token gets a uniform random score and the top C are kept, per KV head:

    s_j ~ U(0, 1),  keep = top C by s

As kvpress with a seed: the draws come from a generator seeded with `seed` at every layer (so every
layer of a prompt draws the same scores), shape (batch, kv_heads, n), on the CPU then moved (the same
draws on every device). kvpress's default is unseeded; kvbench's is seed 0, so a run repeats.
`stage: decode`: each step draws anew from a generator seeded with (seed, layer, tokens seen), so the
victim is a fresh random unprotected token (a fixed draw would evict the newest token every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import Method


def uniform(shape, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator).to(device)


@dataclass
class Random(Method):
    seed: int = 0

    name: ClassVar[str] = "random"
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "none (seeded draws)"
    reference: ClassVar[str] = "kvpress RandomPress"

    def prefill_scores(self, layer, stats):
        return uniform(layer.view("pos").shape, self.seed, layer.values.device)

    def eviction_scores(self, layer):
        step_seed = hash((self.seed, layer.layer_idx, layer.seen)) & 0x7FFF_FFFF_FFFF_FFFF
        return uniform(layer.view("pos").shape, step_seed, layer.values.device)
