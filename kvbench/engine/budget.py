"""How many tokens a method may keep: `budget.tokens=N` per head per layer, or `budget.ratio=r` of the prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvbench.errors import KVBenchError


@dataclass(frozen=True)
class Budget:
    """Tokens kept per head per layer (sinks and windows included), absolute or as a ratio of the prompt."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        if self.tokens is not None and self.ratio is not None:
            raise KVBenchError("set one of budget.tokens and budget.ratio, not both (use budget=tokens or budget=ratio)")
        if self.tokens is not None and (isinstance(self.tokens, bool) or int(self.tokens) != self.tokens or self.tokens <= 0):
            raise KVBenchError(f"budget.tokens={self.tokens} must be a whole number > 0")
        if self.ratio is not None and not (0 < float(self.ratio) <= 1):
            raise KVBenchError(f"budget.ratio={self.ratio} must be in (0, 1]")

    @classmethod
    def from_config(cls, cfg) -> Budget:
        tokens, ratio = cfg.get("tokens"), cfg.get("ratio")
        return cls(tokens=None if tokens is None else int(tokens), ratio=None if ratio is None else float(ratio))

    def resolve(self, prompt_len: int | None) -> int | None:
        """Budget in tokens for a prompt of `prompt_len` tokens; None means unlimited."""
        if self.tokens is not None:
            return int(self.tokens)
        if self.ratio is not None:
            if prompt_len is None:
                raise KVBenchError("budget.ratio needs a prompt to be a ratio of; use budget.tokens for streamed text")
            return max(1, math.floor(self.ratio * prompt_len))
        return None

    @property
    def label(self) -> str:
        if self.tokens is not None:
            return f"tokens{self.tokens}"
        if self.ratio is not None:
            return f"ratio{self.ratio:g}"
        return "full"
