"""The engine's small types: what a method sees of the engine, and what the engine expects of a method.

A method (kvbench/methods/) imports these and `kvbench.engine.budget` only, never the cache itself:

- `StatsRequest` / `Stats`: the attention statistics a method asks for in a phase, and gets;
- `LayerView`: what a method may read and write of one layer's store (slot views of its per-token state);
- `Victim`: the token a decode step evicts; `ModelShape`: what per-head allocation knows of the model;
- `Policy`: the hooks the cache calls (kvbench.methods.base.Method implements them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from kvbench.engine.budget import Budget


@dataclass
class StatsRequest:
    """What a method needs from one attention call; all off by default (full, StreamingLLM)."""

    colsum: bool = False  # sum over every query of its attention on each key
    window: int = 0  # mean attention of the last `window` queries on each key
    row: bool = False  # attention of the (single) decode query on each key
    per_query_head: bool = False  # the window statistic per query head, not averaged over a GQA group
    queries: bool = False  # the layer's queries before RoPE and the model's RoPE tables (Stats.queries, .rope)
    out_proj: bool = False  # the layer's output projection weight (Stats.out_proj)
    window_probs: int = 0  # the attention rows of the last `window_probs` queries, per query head (Stats.window_probs)
    window_queries: int = 0  # the last `window_queries` queries as the attention got them (Stats.window_queries)

    def any(self) -> bool:
        """An attention statistic is asked for (the queries are no attention statistic)."""
        return self.colsum or self.window > 0 or self.row or self.window_probs > 0


@dataclass
class Stats:
    """Per-KV-head attention statistics of one layer call, each (batch, kv_heads, kv_len) float32
    (the window statistic is (batch, query_heads, kv_len) when requested `per_query_head`).

    Asked for `queries`: `queries` (batch, query_heads, n_queries, head_dim), the call's queries before RoPE in
    their own dtype (RoPE undone at their positions: what the layer's projection, and its norm if any, gave),
    and `rope`, the model's RoPE for this layer: positions (n,) long -> cos, sin (n, head_dim) float32 as the
    model applies them (x cos + rotate_half(x) sin; its attention scaling included).

    Asked for `window_probs` = w: the softmax rows of the last w queries, (batch, query_heads, w, kv_len)
    float32 (causal, with the layer's softcap, window and sinks), before any cut.

    Asked for `out_proj`: the layer's output projection weight (hidden, query_heads x head_dim), as the
    module holds it (query head h's block is columns h x head_dim to (h + 1) x head_dim)."""

    n_queries: int
    colsum: torch.Tensor | None = None
    window: torch.Tensor | None = None
    row: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    out_proj: torch.Tensor | None = None
    window_probs: torch.Tensor | None = None
    window_queries: torch.Tensor | None = None  # (batch, query_heads, w, head_dim), after RoPE

    def last(self, n: int) -> Stats:
        """The statistics of the last `n` keys (a sliding layer's window, cut before the method sees it);
        the queries are not per key and stay whole."""
        cut = lambda x: None if x is None else x[..., -n:]  # noqa: E731
        return replace(self, colsum=cut(self.colsum), window=cut(self.window), row=cut(self.row),
                       window_probs=cut(self.window_probs))


@dataclass(frozen=True)
class RepeatPrompts:
    """What a method that reconstructs the prompt (KVzip) asks the model to continue, as token ids (n,) long:
    the prompt for the first chunk and for the later ones, the chat template's `suffix` between a user's
    message and the answer, and `prefix`, the prompt tokens of the template's opening (never repeated).
    A tokenizer gives them (`kvbench.models.chat.repeat_prompts`); the engine runs the passes."""

    prefix: int
    first: torch.Tensor
    later: torch.Tensor
    suffix: torch.Tensor


class Victim(NamedTuple):
    """The token a decode step evicts in each (batch, head): its slot and position (batch, heads), and its
    eviction score (batch, heads, 1) float32."""

    slot: torch.Tensor
    pos: torch.Tensor
    score: torch.Tensor


@dataclass(frozen=True)
class ModelShape:
    """What a per-head allocation needs to know of the model."""

    num_layers: int
    query_heads: int
    kv_heads: int


class LayerView(Protocol):
    """One layer's cache as a method sees it. Slots hold tokens in no particular order; `view(name)` is the
    (batch, kv_heads, length) tensor of a per-token state over the valid slots (`pos`: original position;
    the method's own `slot_state`), writable in place."""

    layer_idx: int
    length: int  # valid slots
    seen: int  # tokens ever written: the next original position
    recent: int  # the protected recent window of this layer's allocation (0 before the prompt's cut)
    notes: dict  # a method's own per-layer values for this sequence (e.g. CAKE's layer preference)
    index: tuple[torch.Tensor, ...]  # batch and head index tensors that address one slot per (batch, head)

    def view(self, name: str) -> torch.Tensor: ...

    def part(self, name: str, start: int, n: int) -> torch.Tensor: ...

    @property
    def values(self) -> torch.Tensor: ...


class Policy(Protocol):
    """The hooks CompressedCache calls; `kvbench.methods.base.Method` documents each."""

    stage: str
    positions: str
    compresses: bool
    per_head: bool
    chunk: int  # > 0: the prompt cut keeps whole chunks of `chunk` positions (ChunkKV; `selection.chunk_rank`)
    quant: str  # none | kivi2 | kivi4: the KV after the prompt's cut held quantized (kvbench.engine.quantized)
    key_channels: float  # > 0: ThinK, the prompt's key channels pruned after its cut (`kept_channels`)
    channel_window: int
    quant_group: int
    quant_residual: int
    slot_state: tuple[str, ...]
    reconstructs: bool  # scores come from reconstruction passes after the prompt (KVzip)
    rewritten_state: tuple[str, ...]

    def allocate(self, budget: Budget, prompt_len: int | None) -> tuple[int | None, int, int]: ...

    def layer_allocations(self, layers: list[LayerView], stats: Stats, allocation: tuple[int | None, int, int],
                          shape: ModelShape) -> list[tuple[int | None, int, int] | None] | None: ...

    def recut_scores(self, layer: LayerView) -> torch.Tensor | None: ...

    def kept_channels(self, layer: LayerView, stats: Stats, packed: tuple | None = None) -> torch.Tensor: ...

    def statistics(self, phase: str) -> StatsRequest: ...

    def prefill_scores(self, layer: LayerView, stats: Stats) -> torch.Tensor | None: ...

    def head_budgets(self, layer_idx: int, scores: torch.Tensor, budget: int, shape: ModelShape) -> torch.Tensor: ...

    def cut_scores(self, layer: LayerView, stats: Stats, scores: torch.Tensor | None, budgets: torch.Tensor | int,
                   protected: torch.Tensor | None = None) -> torch.Tensor | None: ...

    def decode_update(self, layer: LayerView, stats: Stats) -> None: ...

    def before_compact(self, layer: LayerView, keep: torch.Tensor) -> None: ...

    def before_evict(self, layer: LayerView, victim, scores: torch.Tensor | None) -> None: ...

    def eviction_scores(self, layer: LayerView) -> torch.Tensor | None: ...

    # a method that `reconstructs` (KVzip) scores the prompt by passes the Session runs after it (phase
    # "reconstruct"), then the cache cuts every layer at once (kvbench.methods.kvzip documents the three)
    def reconstruction_passes(self, context: torch.Tensor, prompts: RepeatPrompts) -> list: ...

    def reconstruction_scores(self, layer: LayerView, queries: torch.Tensor, span: tuple[int, int]) -> torch.Tensor: ...

    def reconstructed_budgets(self, scores: list[torch.Tensor], prefix: int, budget: int) -> list[torch.Tensor]: ...
