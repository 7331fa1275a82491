"""A layer's KV with pruned key channels (ThinK, `method.key_channels`): the prompt's keys hold only the kept
channels of each KV head, decoded tokens are appended whole; `keep` drops tokens (decode-stage eviction).

The attention reads the keys with the pruned channels as zeros (what kvpress's ThinKPress computes by zeroing
them in place), so the logits are the kept channels' dot products; the memory held is the kept channels only.
"""

from __future__ import annotations

import torch


class PrunedKeys:
    """The first `append` (the prompt, after its cut) stores only the key channels `kept` (B, H, D') of each head;
    later tokens are appended whole; values are kept whole."""

    def __init__(self, kept: torch.Tensor):
        self.kept = kept.sort(dim=-1).values
        self.prefix: torch.Tensor | None = None  # (B, H, n, D') the prompt's kept channels
        self.tail_keys: torch.Tensor | None = None  # (B, H, t, D) the keys appended since
        self.all_values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.all_values.shape[2]

    @property
    def batch(self) -> int:
        return self.all_values.shape[0]

    @property
    def nbytes(self) -> int:
        held = (self.prefix, self.kept, self.tail_keys, self.all_values)
        return sum(t.numel() * t.element_size() for t in held)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.prefix is None:
            self.dim = k.shape[-1]
            self.prefix = k.gather(-1, self.kept[:, :, None].expand(-1, -1, k.shape[2], -1)).contiguous()
            self.tail_keys, self.all_values = k[:, :, :0].clone(), v.clone()
            return
        self.tail_keys = torch.cat((self.tail_keys, k), dim=2)
        self.all_values = torch.cat((self.all_values, v), dim=2)

    def keys(self) -> torch.Tensor:
        """(B, H, n, D): the prompt's keys with the pruned channels zero, then the appended keys."""
        b, h, n, _ = self.prefix.shape
        full = self.prefix.new_zeros(b, h, n, self.dim)
        full.scatter_(-1, self.kept[:, :, None].expand(-1, -1, n, -1), self.prefix)
        return torch.cat((full, self.tail_keys), dim=2)

    def values(self) -> torch.Tensor:
        return self.all_values

    def keep(self, indices: torch.Tensor) -> None:
        """Keep slots `indices` (B, H, C), distinct in each head; drop the others (decode-stage eviction). The
        prompt tokens every head still holds stay pruned; a head holding more of them than another passes its
        newer ones to the appended keys as the attention reads them (pruned channels zero): nothing read changes."""
        idx = indices.sort(dim=-1).values
        shared = int((idx < self.prefix.shape[2]).sum(-1).min())
        take = lambda x, i: x.gather(2, i[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
        self.tail_keys = take(self.keys(), idx[..., shared:])
        self.prefix = take(self.prefix, idx[..., :shared])
        self.all_values = take(self.all_values, idx)
