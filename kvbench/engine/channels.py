"""A layer's KV with pruned key channels (ThinK, `method.key_channels`): the prompt's keys hold only the kept
channels of each KV head, decoded tokens are appended whole.

The attention reads the keys with the pruned channels as zeros (what kvpress's ThinKPress computes by zeroing
them in place), so the logits are the kept channels' dot products; the memory held is the kept channels only.
"""

from __future__ import annotations

import torch


class PrunedKeys:
    """keys (B, H, n, D) whose channels `kept` (B, H, D') alone are stored, values (B, H, n, D) whole; later
    tokens appended whole."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor):
        self.dim = keys.shape[-1]
        self.kept = kept.sort(dim=-1).values
        self.prefix = keys.gather(-1, self.kept[:, :, None].expand(-1, -1, keys.shape[2], -1)).contiguous()
        self.tail_keys = keys[:, :, :0].clone()
        self.all_values = values.clone()

    @property
    def length(self) -> int:
        return self.all_values.shape[2]

    @property
    def nbytes(self) -> int:
        held = (self.prefix, self.kept, self.tail_keys, self.all_values)
        return sum(t.numel() * t.element_size() for t in held)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
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
