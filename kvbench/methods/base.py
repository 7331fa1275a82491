"""What every compression method shares; the engine (kvbench.engine) does the rest.

A method is a small dataclass. The engine asks it four things:

- `allocate(budget, L)`: the budget in tokens C for a prompt of L tokens, and
  how many of them are protected sinks (the first positions) and how many form
  the protected recent window (default: `budget.resolve(L)` and `split(C)`);
  `layer_allocations` may give each layer its own at the prompt;
- `stats_request(phase)`: which attention statistics the attention function
  must compute in this phase (`prefill` or `decode`);
- `prefill_scores(layer, stats)`: an importance per cached token after the
  prompt (keep the highest), or None to keep the most recent;
- `decode_update(layer, stats)` and `eviction_scores(layer)`: for `stage:
  decode`, fold one step's statistics into the per-token state, and rank the
  tokens for eviction (lowest first; None: the oldest goes).

Protection (sinks, recent window), top-k keep, compaction, slot reuse,
positions and budgets live once in the engine, not in each method.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from kvbench.engine.budget import Budget
from kvbench.engine.types import LayerView, ModelShape, Stats, StatsRequest, Victim
from kvbench.errors import KVBenchError
from kvbench.methods.critical import critical_scores
from kvbench.methods.layers import cake_allocations, cut_scores_now, keep_cut_scores, pyramid_cap
from kvbench.methods.think import kept_channels, kept_segment_channels
from kvbench.methods.wrappers import check_wrappers

__all__ = ["Method", "ModelShape", "Victim"]

STAGES = ("prefill", "decode")
GQA_LAYOUTS = ("kv", "expand")
HEAD_LAYOUTS = ("equal", "ada")
POSITIONS = ("original", "shifted")
QUERY_MODES = ("aware", "agnostic")


@dataclass
class Method:
    stage: str = "prefill"  # prefill: compress once after the prompt; decode: also hold the budget every step
    positions: str = "original"  # original RoPE positions, or shifted: positions inside the cache
    sinks: int = 0  # the first `sinks` positions are always kept
    gqa: str = "kv"  # kv: one kept set per KV head | expand: per query head (SnapKV family, as the reference codes)
    # equal: every head of a layer keeps C tokens | ada: the layer's heads share H x C tokens by a global top-k of
    # the method's scores, each head keeping at least its top ada_floor x C (Ada-KV; kvpress AdaKVPress)
    heads: str = "equal"
    ada_floor: float = 0.2
    # aware: compress the whole prompt, question included | agnostic: compress the context alone, then append
    # the question uncompressed and generate (kvpress's query-agnostic protocol; tasks mark where the question starts)
    query: str = "aware"
    # 0: off | N: ChunkKV (arXiv:2502.00299; kvpress ChunkKVPress): the prompt cut keeps whole chunks of N
    # consecutive positions, ranked by the method's scores summed over heads and averaged over the chunk, the
    # same chunks in every head (methods with a plain top-k cut, stage prefill; see engine.selection.chunk_rank)
    chunk: int = 0
    # CriticalKV (arXiv:2502.03805; kvpress CriticalKVPress, CriticalAdaKVPress with heads: ada): the prompt cut
    # keeps each head's top critical_ratio share by the method's score, the rest by (score + critical_epsilon)
    # x ||W_o v||_1 (kvbench.methods.critical)
    critical: bool = False
    critical_ratio: float = 0.5
    critical_epsilon: float = 1e-4
    # uniform: every layer keeps C | pyramid: PyramidKV's schedule of layer budgets, mean C, lower layers more
    # | cake: CAKE's layer budgets (arXiv:2503.12491) from each layer's attention entropy and variance, earlier
    # layers cut again as later ones come (kvbench.methods.layers; for methods with a plain top-k cut, stage prefill)
    layers: str = "uniform"
    pyramid_beta: int = 20
    # layers: cake: the preference H^(1/tau1) x V^(1/tau2) of the last cake_window queries' attention (CAKE's
    # tau1, tau2 and window; method=cake has its own window)
    tau1: float = 1.0
    tau2: float = 1.0
    cake_window: int = 32
    # none | kivi2 | kivi4: KIVI (arXiv:2402.02750): after the prompt's cut the layer's KV is held at 2 or 4 bits,
    # keys per channel and values per token in groups of quant_group, the newest quant_residual tokens unquantized
    # (kvbench.engine.quantized); a decode-stage method evicts from the quantized store
    quant: str = "none"
    quant_group: int = 32
    quant_residual: int = 128
    # ThinK (arXiv:2407.21018; kvpress ThinKPress): after the prompt's cut each KV head stores only its key channels
    # of highest query x key energy, int(D x key_channels) of them pruned (kvbench.methods.think); 0: off
    key_channels: float = 0.0
    channel_window: int = 32

    name: ClassVar[str] = "base"
    # what `kvbench list methods` shows: scores depend on the prompt's queries (the question among them), the
    # extra work and memory beyond a forward pass, and the paper and reference code the method follows
    query_aware: ClassVar[bool] = True
    cost: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    compresses: ClassVar[bool] = True
    # the stages it is defined for (a prompt-only method scores the prompt once; `kvbench list methods` shows them)
    stages: ClassVar[tuple[str, ...]] = STAGES
    # takes `heads: ada` (a method with scores for every prompt token, a plain top-k cut at the prompt)
    adapts: ClassVar[bool] = True
    # per-token tensors the cache keeps for this method, moved with their tokens
    slot_state: ClassVar[tuple[str, ...]] = ()
    # the slot states this method writes for every new token before reading them (not zeroed on write)
    rewritten_state: ClassVar[tuple[str, ...]] = ()
    # writes a victim's value into another token's at a decode eviction (WeightedKV): no compact store then
    merges: ClassVar[bool] = False
    # scored by passes that reconstruct the prompt, after it (KVzip: kvbench.methods.kvzip)
    reconstructs: ClassVar[bool] = False
    # supports `gqa: expand` (a method that does not compress accepts it and stores its full cache)
    expands: ClassVar[bool] = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise KVBenchError(f"method.stage={self.stage} is not one of: {', '.join(STAGES)}")
        if self.stage not in self.stages:
            raise KVBenchError(f"{self.name} compresses the prompt only: use method.stage=prefill")
        if self.positions not in POSITIONS:
            raise KVBenchError(f"method.positions={self.positions} is not one of: {', '.join(POSITIONS)}")
        if self.sinks < 0:
            raise KVBenchError(f"method.sinks={self.sinks} must be >= 0")
        if self.query not in QUERY_MODES:
            raise KVBenchError(f"method.query={self.query} is not one of: {', '.join(QUERY_MODES)}")
        if self.query == "agnostic" and self.stage != "prefill":
            raise KVBenchError("method.query=agnostic compresses the context once, before the question: use "
                               "method.stage=prefill (a decode-stage method evicts the question while generating)")
        if self.gqa not in GQA_LAYOUTS:
            raise KVBenchError(f"method.gqa={self.gqa} is not one of: {', '.join(GQA_LAYOUTS)}")
        if self.heads not in HEAD_LAYOUTS:
            raise KVBenchError(f"method.heads={self.heads} is not one of: {', '.join(HEAD_LAYOUTS)}")
        if self.heads == "ada":
            if not self.adapts:
                raise KVBenchError(f"method.heads=ada takes a method that scores every prompt token at a plain top-k "
                                   f"cut; {self.name} does not (for SnapKV's own Ada-KV: method=ada_snapkv)")
            if self.stage != "prefill" or self.positions != "original":
                raise KVBenchError("method.heads=ada compresses the prompt into a ragged store: use "
                                   "method.stage=prefill method.positions=original")
            if not 0 <= self.ada_floor <= 1:
                raise KVBenchError(f"method.ada_floor={self.ada_floor} must be in [0, 1]")
        check_wrappers(self)
        if self.gqa == "expand" and self.compresses and not self.expands:
            raise KVBenchError(
                f"method.gqa=expand is for snapkv, pyramidkv, ada_snapkv and headkv; {self.name} keeps one set per "
                "KV head: use method.gqa=kv"
            )

    def kept_channels(self, layer: LayerView, stats: Stats, packed: tuple | None = None) -> torch.Tensor:
        """ThinK: the key channels each KV head keeps after the prompt's cut (`kvbench.methods.think`); with
        `packed` = (keys (N, D), lengths (B, H)), each segment of a ragged store (per-head budgets)."""
        if packed is not None:
            return kept_segment_channels(stats.window_queries, *packed, self.key_channels)
        return kept_channels(stats.window_queries, layer.view("keys"), self.key_channels)

    def cut_scores(self, layer: LayerView, stats: Stats, scores: torch.Tensor | None, budgets: torch.Tensor | int,
                   protected: torch.Tensor | None = None) -> torch.Tensor | None:
        """The scores the prompt cut ranks by, once the tokens each head keeps are known (`budgets`, (batch, heads)
        or one number; `protected`: tokens the cut keeps anyway, when the scores do not already rank them +inf):
        the method's own, or with `critical` CriticalKV's two stages (`kvbench.methods.critical`)."""
        if not self.critical or scores is None:
            return scores
        if protected is not None:  # protected tokens rank first in its first stage too
            scores = scores.float().masked_fill(protected, float("inf"))
        if isinstance(budgets, int):
            budgets = torch.full(scores.shape[:2], budgets, dtype=torch.long, device=scores.device)
        # Ada-KV's safe tokens per head: int(C x ada_floor), C the layer's budget, the mean of the head budgets
        safe = int(budgets.float().mean() * self.ada_floor) if self.heads == "ada" else 0
        return critical_scores(scores, layer.view("values"), stats.out_proj, budgets, self.critical_ratio,
                               self.critical_epsilon, safe)

    @property
    def cuts_layers_again(self) -> bool:
        """An earlier layer may be cut again at a later layer's prompt cut (CAKE's cascade: `layers: cake`)."""
        return self.layers == "cake"

    @property
    def per_head(self) -> bool:
        """Heads keep different numbers of tokens (a ragged store, sized by `head_budgets`)."""
        return self.heads == "ada"

    @property
    def label(self) -> str:
        """The method's folder name in results/runs/ (variants that papers report as rows differ)."""
        return self.name + self.heads_suffix

    @property
    def heads_suffix(self) -> str:
        return "-ada" if self.heads == "ada" else ""

    @property
    def run_label(self) -> str:
        """The label and the settings papers report as rows apart: `-chunkN` (ChunkKV), `-critical` (CriticalKV),
        `-pyramid` / `-cake` (PyramidKV's / CAKE's layer budgets), `-kivi2`/`-kivi4` (a quantized KV), `-thinkR`
        (ThinK), `-agnostic` (query-agnostic compression; a full cache is the same either way)."""
        suffixes = [f"chunk{self.chunk}" if self.chunk else "", "critical" if self.critical else "",
                    self.layers if self.layers != "uniform" else "", self.quant if self.quant != "none" else "",
                    f"think{self.key_channels:g}" if self.key_channels else "",
                    "agnostic" if self.query == "agnostic" and self.compresses else ""]
        return "-".join([self.label, *filter(None, suffixes)])

    def head_budgets(self, layer_idx: int, scores: torch.Tensor, budget: int, shape: ModelShape) -> torch.Tensor:
        """`heads: ada` (Ada-KV as kvpress's AdaKVPress computes it): each head's top int(ada_floor x C) scores
        are safe, then the layer's H x C kept slots go to the largest scores over all its heads (safe ones
        first); tokens kept per head, (batch, heads) long. Protected tokens (sinks, recent) score +inf."""
        batch, heads, n = scores.shape
        ranked = scores.float().clone()
        safe = ranked.topk(min(n, int(budget * self.ada_floor)), dim=-1).indices
        ranked.scatter_(-1, safe, float("inf"))
        chosen = ranked.reshape(batch, heads * n).topk(heads * budget, dim=-1).indices
        counts = torch.zeros(batch, heads, dtype=torch.long, device=scores.device)
        return counts.scatter_add_(1, chosen // n, torch.ones_like(chosen))

    def allocate(self, budget: Budget, prompt_len: int | None) -> tuple[int | None, int, int]:
        """(C, sinks, recent) for a prompt of `prompt_len` tokens; C None means no limit."""
        total = budget.resolve(prompt_len)
        if total is None:
            return None, 0, 0
        sinks, recent = self.split(total)
        return total, sinks, recent

    def layer_allocations(self, layers: list[LayerView], stats: Stats, allocation: tuple[int | None, int, int],
                          shape: ModelShape):
        """Per-layer budgets, asked at each layer's prompt cut with the layers so far (the last is this one,
        `stats` its statistics): None for the prompt's `allocation` everywhere (`layers: uniform`), or one
        entry per layer, (C, sinks, recent) ((None, 0, 0): no limit) or None (unchanged). An earlier layer
        given a smaller budget is cut again by `recut_scores` (CAKE's cascade). `layers: pyramid` sets this
        layer's from PyramidKV's schedule, `layers: cake` every layer's so far from CAKE's preferences, keeping
        this layer's own scores for its later cuts (computed here once more: the statistics are this call's)
        (`kvbench.methods.layers`)."""
        budget, sinks, recent = allocation
        if self.layers == "uniform" or budget is None:
            return None
        layer, protected = layers[-1], sinks + recent
        if self.layers == "cake":
            if layer.seen <= budget:
                return None  # nothing to cut
            if len(layers) < shape.num_layers:  # a later layer's cut may cut it again
                keep_cut_scores(layer, self.prefill_scores(layer, stats))
            return cake_allocations(layers, stats.window_probs[:, :, -self.cake_window:], allocation,
                                    shape.num_layers, self.tau1, self.tau2)
        cap = pyramid_cap(layer.layer_idx, shape.num_layers, budget - protected, layer.seen - protected,
                          self.pyramid_beta)
        return [None] * (len(layers) - 1) + [(cap + protected, sinks, recent)]

    def recut_scores(self, layer: LayerView) -> torch.Tensor | None:
        """Scores for cutting an earlier layer again (`layer_allocations`); None: keep the most recent.
        `layers: cake`: the method's own scores at that layer's cut, kept by position."""
        return cut_scores_now(layer) if self.layers == "cake" else None

    def split(self, budget: int) -> tuple[int, int]:
        """(sinks, recent) protected inside a budget of `budget` tokens; their sum never exceeds it."""
        sinks = min(self.sinks, budget)
        return sinks, 0

    def stats_request(self, phase: str) -> StatsRequest:
        return StatsRequest()

    def statistics(self, phase: str) -> StatsRequest:
        """What the engine computes in `phase`: the method's own statistics (`stats_request`; none for a method
        that keeps everything, nor at a decode step of a prompt-only method), and at the prompt those of the
        settings it turns on (CriticalKV: the output projection; ThinK: the last queries; `layers: cake`: the
        attention rows of the last `cake_window` queries)."""
        own = self.compresses and (phase == "prefill" or self.stage == "decode")
        request = self.stats_request(phase) if own else StatsRequest()
        if phase == "prefill" and (self.critical or self.key_channels):
            request = replace(request, out_proj=self.critical,
                              window_queries=self.channel_window if self.key_channels else 0)
        if phase == "prefill" and self.layers == "cake":
            request = replace(request, window_probs=max(request.window_probs, self.cake_window))
        return request

    def prefill_scores(self, layer: LayerView, stats: Stats) -> torch.Tensor | None:
        return None

    def decode_update(self, layer: LayerView, stats: Stats) -> None:
        return None

    def before_compact(self, layer: LayerView, keep: torch.Tensor) -> None:
        """Called with the slots about to be kept at the prompt cut (methods that merge act here)."""
        return None

    def before_evict(self, layer: LayerView, victim, scores: torch.Tensor | None) -> None:
        """Called at a decode step with the token about to be evicted (a `Victim`; for recency, scores None,
        its slot) and the eviction scores."""
        return None

    def eviction_scores(self, layer: LayerView) -> torch.Tensor | None:
        """Lowest is evicted first (the older of equal scores); None (the default): recency, the oldest
        token after the sinks goes."""
        return None
