"""CompressedCache: a transformers `Cache` that owns the KV store and applies a method's policy.

Layout, per layer: keys and values `(batch, kv_heads, capacity, head_dim)`, the
two halves of one buffer `kv`, with `length` valid slots, and per-token state
`(batch, kv_heads, capacity)`: `pos` (original position, always), the method's
`slot_state` (e.g. `score`), and in `shifted` mode `rot` (the position the
stored key was rotated at) and `rank` (its position inside the cache now). The
integer states share one buffer and the float ones another, so a decode step
writes and moves every state of a token in one op per buffer. Slots need not be in position
order; every rule is stated on positions.

- prefill (`phase == "prefill"`): after the layer's attention has run, the
  method scores the prompt tokens and the layer is compacted at once to the
  budget (sinks + recent window protected, top-k of the rest), so at most one
  layer holds its full KV at any time.
- decode (`stage: decode`): the new token is written into a free slot; when the
  cache is over budget, the lowest-ranked unprotected token (the older among equals) is evicted and the
  last slot moves into its place (slot reuse: O(1) data movement, O(C) scoring). Recency eviction
  (StreamingLLM) knows its victim without looking at the positions: one token a step keeps the slots
  after the sinks a ring in position order (see `CompressedLayer.ring`).
- positions `original`: keys keep the RoPE position they were computed at and
  queries continue counting. `shifted`: new tokens are placed at the cache
  length, and keys are returned rotated from the position they were stored at
  to their current rank (the stored keys are never re-rotated in place, so no
  rounding error accumulates over a long stream).
- per-head budgets (HeadKV, Ada-SnapKV, PyramidKV: `method.per_head`): at the
  prompt each head keeps its own number of tokens and the layer moves to a
  ragged store (`kvbench.engine.ragged.RaggedKV`, stored bytes = the sum of the head
  budgets); decoded tokens are appended to it. With `method.gqa: expand` the
  store holds one segment per query head (each KV head repeated to its G query
  heads, as the reference codes do), and G x the tokens.
- a prompt no longer than the budget is left alone.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.engine.architecture import layer_windows, text_config
from kvbench.engine.budget import Budget
from kvbench.engine.channels import PrunedKeys
from kvbench.engine.quantized import BITS, QuantizedKV
from kvbench.engine.ragged import RaggedKV
from kvbench.engine.ranking import select_per_head
from kvbench.engine.selection import lowest, oldest, select
from kvbench.engine.types import ModelShape, Policy, Stats, StatsRequest, Victim
from kvbench.errors import KVBenchError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


INT_STATE = ("pos", "rot", "rank")


class CompressedLayer(CacheLayerMixin):
    """One layer's KV store with per-token state; see the module docstring."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: CompressedCache, layer_idx: int, window: int | None = None):
        super().__init__()
        self.owner = weakref.proxy(owner)  # no reference cycle: a finished cache is freed at once, not at a gc pass
        self.layer_idx = layer_idx
        self.window = window  # sliding-window attention: a query at p sees keys p - window < pos <= p
        self.gaps = False  # a sliding layer holds tokens a method chose (not the newest in a row): mask by positions
        self.length = 0  # valid slots
        self.peak = 0  # the most slots it has held at once (a prompt before its compression included)
        self.seen = 0  # tokens ever written (the next original position)
        self.state: dict[str, torch.Tensor] = {}
        self.moved = False  # shifted mode: some key's rank differs from the position it was stored at
        self.ragged: RaggedKV | None = None  # per-head budgets: the layer's store after the prompt
        self.own_allocation: tuple[int | None, int, int] | None = None  # the method's for this layer, at the prompt
        self.notes: dict = {}  # the method's per-layer values for this sequence
        # after the prompt, a compact store: KIVI's quantized KV (method.quant) or ThinK's pruned keys
        # (method.key_channels); it holds the tokens, the attention reads what its keys() and values() give
        self.store: QuantizedKV | PrunedKeys | None = None
        self.kv: torch.Tensor | None = None  # (2, batch, heads, capacity, head_dim): keys = kv[0], values = kv[1]
        self.index: tuple[torch.Tensor, ...] = ()  # batch and head index tensors for one slot per (batch, head)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (kv or a state group, its row index)
        self.scores: torch.Tensor | None = None  # the float state group, zeroed where a token is written
        self._parts: dict[tuple[str, int, int], torch.Tensor] = {}  # part(): views reused while the buffers are
        # recency eviction: slots [sinks, ring_end) hold the non-sink tokens in position order rotated by
        # `rotation` (the oldest at sinks + rotation), slots [ring_end, length) newer ones in order; None: unknown
        self.ring_end: int | None = 0
        self.rotation = 0

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    @property
    def layer_type(self) -> str:
        return "sliding_attention" if self.window else "full_attention"

    @property
    def allocation(self) -> tuple[int | None, int, int] | None:
        """(budget, sinks, recent) of this layer: the cache's (or the method's for this layer), and on a
        sliding layer at most its window's `window - 1` tokens (what the model itself keeps), no sinks (they
        left the window), the recent window cut to the budget."""
        allocation = self.own_allocation or self.owner.allocation
        if allocation is None or self.window is None:
            return allocation
        budget, _, recent = allocation
        budget = self.window - 1 if budget is None else min(budget, self.window - 1)
        return budget, 0, min(recent, budget)

    # -- transformers' CacheLayerMixin interface
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv_heads = key_states.shape[1]  # a full cache's heads (a gqa: expand store may hold more)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        if self.keys is not None:
            return self.keys.shape[2]
        return self.state["pos"].shape[-1] if "pos" in self.state else 0  # a compact store's token states

    def state_names(self) -> list[str]:
        names = ["pos", *self.owner.method.slot_state]
        if self.owner.shifted:
            names += ["rot", "rank"]
        return names

    def _allocate(self, batch, heads, capacity, head_dim):
        """Fresh buffers: kv (2, batch, heads, capacity, head_dim) (None without a head_dim: a compact store
        holds the tokens), and the state by name, each a row of its group's buffer (k, batch, heads,
        capacity): {group buffer: its names}."""
        kv = None if head_dim is None else \
            torch.empty(2, batch, heads, capacity, head_dim, dtype=self.dtype, device=self.device)
        names = self.state_names()
        state = {}
        for dtype, group in ((torch.long, [n for n in names if n in INT_STATE]),
                             (torch.float32, [n for n in names if n not in INT_STATE])):
            if group:
                buffer = torch.zeros(len(group), batch, heads, capacity, dtype=dtype, device=self.device)
                state[buffer] = {name: buffer[i] for i, name in enumerate(group)}
        if not self.index or self.index[0].shape[0] != batch or self.index[1].shape[1] != heads:
            self.index = (torch.arange(batch, device=self.device)[:, None],
                          torch.arange(heads, device=self.device)[None, :])
        return kv, state

    def _set_buffers(self, kv, groups) -> None:
        self.kv, self.keys, self.values = kv, *((None, None) if kv is None else (kv[0], kv[1]))
        self.state = {name: row for rows in groups.values() for name, row in rows.items()}
        self.buffers = [(b, torch.arange(b.shape[0], device=b.device)[:, None, None])
                        for b in ((kv,) if kv is not None else ()) + tuple(groups)]
        method = self.owner.method
        zeroed = set(method.slot_state) - set(method.rewritten_state)
        self.scores = next((b for b, rows in groups.items() if zeroed & set(rows)), None)
        self._parts = {}

    def _grow(self, key_states, needed: int):
        batch, heads, _, head_dim = key_states.shape
        capacity = max(needed, 2 * self.capacity) if self.capacity else needed
        kv, groups = self._allocate(batch, heads, capacity, None if self.store is not None else head_dim)
        if self.length and kv is not None:
            kv[:, :, :, : self.length] = self.kv[:, :, :, : self.length]
        if self.length:
            for rows in groups.values():
                for name, row in rows.items():
                    row[:, :, : self.length] = self.view(name)
        self._set_buffers(kv, groups)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.store is not None:  # the dequantized keys and values / the pruned channels as zero
            self.store.append(key_states, value_states)
            q = key_states.shape[2]
            if self.state:  # a decode-stage method evicts from the store: the tokens' states, in its slot order
                if self.length + q > self.capacity:
                    self._grow(key_states, self.length + q)
                self._write_state(q)
            else:
                self.seen += q
            return self.store.keys(), self.store.values()
        if self.ragged is not None:  # kvbench_attention reads the ragged store itself
            groups = self.ragged.heads // key_states.shape[1]  # > 1: one segment per query head (gqa: expand)
            if groups > 1:
                key_states = key_states.repeat_interleave(groups, dim=1)
                value_states = value_states.repeat_interleave(groups, dim=1)
            self.ragged.append(key_states, value_states)
            self.seen += key_states.shape[2]
            return key_states, value_states
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self.length + q > self.capacity:
            needed = self.length + q
            self._grow(key_states, self.owner.first_capacity(q) if self.capacity == 0 else needed)
        self.part("keys", self.length, q).copy_(key_states)  # views from part(): a cache at its budget writes
        self.part("values", self.length, q).copy_(value_states)  # the same slot every step
        self._write_state(q)
        return self.current_keys(), self.part("values", 0, self.length)

    def _write_state(self, q: int) -> None:
        """The states of `q` new tokens at the end of the slots (their keys and values are written)."""
        start = self.length
        pos = self.part("pos", start, q)
        if q == 1:
            pos.fill_(self.seen)
        else:
            pos.copy_(torch.arange(self.seen, self.seen + q, device=self.device))
        if self.scores is not None:
            self.part("scores", start, q).zero_()
        if self.owner.shifted:  # rotated at the position ids this step was given
            end = self.owner.position_end
            ranks = torch.arange(end - q, end, device=self.device) if self.window else \
                torch.arange(start, start + q, device=self.device)
            self.part("rot", start, q).copy_(ranks)
            self.part("rank", start, q).copy_(ranks)
        self.length += q
        self.seen += q
        if self.length > self.peak:
            self.peak = self.length

    def current_keys(self) -> torch.Tensor:
        keys = self.part("keys", 0, self.length)
        if self.owner.shifted and self.window:
            # a sliding layer's tokens sit side by side, the newest at the newest query's position (the
            # position ids follow the full-attention layers, whose length differs from this layer's)
            order = self.view("pos").argsort(dim=-1).argsort(dim=-1)
            delta = order + (self.owner.position_end - self.length) - self.view("rot")
            keys = self.owner.rotate(keys, delta, self.layer_type)
        elif self.owner.shifted and self.moved:
            delta = self.state["rank"][:, :, : self.length] - self.state["rot"][:, :, : self.length]
            keys = self.owner.rotate(keys, delta, self.layer_type)
        return keys

    @property
    def recent(self) -> int:
        """The protected recent window of this layer's allocation (0 before the prompt's cut)."""
        allocation = self.allocation
        return allocation[2] if allocation else 0

    def positions(self, q: int):
        """(positions of the stored keys (batch, heads, length), the position after the newest token), for
        a sliding layer's mask after `q` new tokens, when its slots are not the newest tokens in position
        order; None when they are (a prompt into an empty layer; one new token on a layer holding the newest
        tokens, whatever their slot order)."""
        if self.length == q or (q == 1 and not self.gaps):
            return None
        return self.view("pos"), self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.store is not None:
            return self.store.length + query_length, 0
        if self.ragged is not None:
            return self.ragged.max_len + self.ragged.decoded + query_length, 0
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length if self.owner.shifted else self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.kv = self.keys = self.values = self.scores = None
        self.state, self.buffers, self._parts = {}, [], {}
        self.length = self.seen = self.peak = 0
        self.moved = False
        self.gaps = False
        self.ring_end, self.rotation = 0, 0
        self.ragged = None
        self.own_allocation = None
        self.notes = {}
        self.store = None
        self.is_initialized = False

    # -- compression
    def view(self, name: str) -> torch.Tensor:
        """The valid part of a per-token state tensor, (batch, heads, length)."""
        return self.part(name, 0, self.length)

    def part(self, name: str, start: int, n: int) -> torch.Tensor:
        """Slots [start, start + n) of `keys`, `values`, `scores` (the zeroed state group) or a state, as a
        view kept while the buffers are: a cache held at its budget writes and reads the same slots at every
        decode step, so its views are made once (views launch no kernel, but each is an op to dispatch)."""
        if self.store is not None and name in ("keys", "values"):  # as the attention reads them (a new tensor)
            return (self.store.keys() if name == "keys" else self.store.values()).narrow(2, start, n)
        key = (name, start, n)
        view = self._parts.get(key)
        if view is None:
            if len(self._parts) >= 64:  # a growing cache asks for new slots every step
                self._parts.clear()
            if name == "scores":
                view = self.scores.narrow(3, start, n)
            else:
                view = (getattr(self, name) if name in ("keys", "values") else self.state[name]).narrow(2, start, n)
            self._parts[key] = view
        return view

    def protected(self, sinks: int, recent: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        pos = self.view("pos") if pos is None else pos
        if not sinks:
            return pos >= self.seen - recent
        if not recent:
            return pos < sinks
        if self.seen - recent > sinks:  # pos < sinks or pos >= seen - recent: outside [sinks, seen - recent - 1]
            return pos.clamp(sinks, self.seen - recent - 1).ne(pos)
        return torch.ones_like(pos, dtype=torch.bool)

    def compact(self, keep: torch.Tensor, extra: int) -> None:
        """Keep slots `keep` (batch, heads, C), in position order, in fresh buffers of capacity C + extra."""
        batch, heads, kept = keep.shape
        head_dim = self.keys.shape[-1]
        order = self.view("pos").gather(2, keep).argsort(dim=-1)
        keep = keep.gather(2, order)
        kv, groups = self._allocate(batch, heads, kept + extra, head_dim)
        index = keep[..., None].expand(-1, -1, -1, head_dim)
        kv[0, :, :, :kept] = self.keys[:, :, : self.length].gather(2, index)
        kv[1, :, :, :kept] = self.values[:, :, : self.length].gather(2, index)
        for rows in groups.values():
            for name, row in rows.items():
                row[:, :, :kept] = self.view(name).gather(2, keep)
        self._set_buffers(kv, groups)
        if self.owner.shifted:
            self.state["rank"][:, :, :kept] = torch.arange(kept, device=self.device)
            self.moved = True
        self.length = kept
        self.ring_end, self.rotation = 0, 0  # slots in position order

    def kept_per_head(self) -> list[int] | None:
        """Tokens each KV head of sequence 0 holds now (None before any token)."""
        if self.ragged is not None:
            return self.ragged.kept_per_head[0].tolist()
        if self.store is not None:
            return [self.store.length] * self.kv_heads
        if not self.is_initialized or self.keys is None:
            return None
        return [self.length] * self.keys.shape[1]

    def bytes_per_token(self) -> int:
        """Bytes of one token's key and value in one head, unquantized."""
        if self.store is not None:
            return 2 * self.head_dim * self.dtype.itemsize
        keys = self.ragged.decode_keys if self.ragged is not None else self.keys
        return 2 * keys.shape[-1] * keys.element_size()

    def kept_bytes(self) -> int:
        """Bytes one sequence's KV holds in this layer (a compact store: as it holds them)."""
        if self.store is not None:
            return self.store.nbytes // self.store.batch
        if self.ragged is not None and (self.ragged.quantized is not None or self.ragged.key_channels is not None):
            return self.ragged.nbytes // self.ragged.batch
        return sum(self.kept_per_head()) * self.bytes_per_token()

    def to_store(self, store: QuantizedKV | PrunedKeys) -> None:
        """Move the layer's tokens (slots in position order: a prompt, or a prompt cut) into a compact store;
        a decode-stage method keeps their states (it evicts from the store, `_evict_from_store`)."""
        self.head_dim = self.keys.shape[-1]
        store.append(self.keys[:, :, : self.length], self.values[:, :, : self.length])
        self.store = store
        method = self.owner.method
        if method.compresses and method.stage == "decode":
            kv, self.kv, self.keys, self.values = self.kv, None, None, None
            self.buffers = [(b, rows) for b, rows in self.buffers if b is not kv]
            self._parts, self.ring_end = {}, None  # eviction keeps the store's slot order: no ring
        else:
            self._free_dense()

    def _free_dense(self) -> None:
        """Drop the dense buffers and per-token states (the tokens moved to another store)."""
        self.kv = self.keys = self.values = self.scores = None
        self.state, self.buffers, self._parts = {}, [], {}
        self.length = 0

    def _evict_from_store(self, victim: torch.Tensor | int) -> None:
        """Drop slot `victim` (batch, heads), or one slot in every head (an int), from the compact store and
        from the states, the other tokens keeping their order (a quantized key keeps its group's scale)."""
        n = self.length
        batch, heads = self.state["pos"].shape[:2]
        slots = torch.arange(n, device=self.device).expand(batch, heads, n)
        victim = torch.as_tensor(victim, device=self.device).expand(batch, heads)
        keep = slots[slots != victim[..., None]].view(batch, heads, n - 1)
        self.store.keep(keep)
        for buffer, _ in self.buffers:
            buffer[..., : n - 1] = buffer[..., :n].gather(3, keep.expand(buffer.shape[0], -1, -1, -1))
        self.length -= 1

    def to_ragged(self, keep: torch.Tensor, reserve: int) -> None:
        """Move to a ragged store holding, per head, the slots where `keep` (batch, heads, length) is True.

        The dense buffers are freed; `reserve` slots per head wait for decoded tokens. A `keep` with more
        heads than the store (gqa: expand) repeats each KV head to its query heads first, as repeat_kv."""
        keys, values, pos = self.keys[:, :, : self.length], self.values[:, :, : self.length], self.view("pos")
        groups = keep.shape[1] // keys.shape[1]
        if groups > 1:
            keys, values, pos = (x.repeat_interleave(groups, dim=1) for x in (keys, values, pos))
        self.ragged = RaggedKV(keys, values, keep, pos, reserve)
        method = self.owner.method
        if method.quant != "none":  # KIVI on per-head budgets: the packed prompt held quantized
            self.owner._check_group(keys.shape[-1])
            self.ragged.quantize(BITS[method.quant], method.quant_group, method.quant_residual)
        self._free_dense()

    def evict(self, victim: torch.Tensor | int, victim_pos: torch.Tensor | None = None, sinks: int = 0) -> None:
        """Drop slot `victim` (batch, heads) in every head (whose positions are `victim_pos` when known), or
        the ring's oldest slot (an int, from `oldest_in_ring(sinks)`) in every head; the last slot moves into
        its place (a victim in the last slot copies onto itself). A compact store keeps its order instead."""
        if self.store is not None:
            return self._evict_from_store(victim)
        last = self.length - 1
        if self.owner.shifted:
            if isinstance(victim, int):
                victim_pos = self.view("pos").narrow(2, victim, 1)
            else:
                victim_pos = self.view("pos").gather(2, victim[..., None]) if victim_pos is None else victim_pos[..., None]
            self.state["rank"][:, :, : self.length] -= (self.view("pos") > victim_pos).long()
            self.moved = True
        if isinstance(victim, int):
            for buffer, _ in self.buffers:
                buffer.select(3, victim).copy_(buffer.select(3, last))
            self._advance_ring(sinks)
        else:  # one slot per (batch, head): index_put_ with the layer's row, batch and head index tensors
            batch, heads = self.index
            for buffer, rows in self.buffers:
                buffer.index_put_((rows, batch, heads, victim), buffer.select(3, last))
            self.ring_end = None  # the slots are no longer known to be a ring in position order
        self.length -= 1

    def oldest_in_ring(self, sinks: int) -> int | None:
        """The slot of the oldest token after the sinks, the same in every head, known from the slot layout
        alone (O(1), no tensor read); None when the layout is not known to be a ring (then search)."""
        if self.ring_end is None:
            return None
        if self.ring_end <= sinks:  # slots in position order
            return sinks
        return sinks + self.rotation if self.length - 1 == self.ring_end else None  # one newer token only

    def _advance_ring(self, sinks: int) -> None:
        """The ring's oldest was evicted and the newest (the last slot) took its place; `length` not yet cut."""
        if self.ring_end <= sinks:  # was in position order: the newest now sits first, the rest after it
            self.ring_end = self.length - 1
            self.rotation = 1 if self.ring_end - sinks > 1 else 0
        else:
            self.rotation = (self.rotation + 1) % (self.ring_end - sinks)


class CompressedCache(Cache):
    """The KV cache of one generation (or one stream), compressed by `method` to `budget`.

    A `kvbench.engine.Session` owns one and drives it: it passes the cache as `past_key_values` and as
    `kvbench_cache` to a model whose attention is kvbench's (`kvbench.engine.install`), and moves `phase`
    from "prefill" to "decode" after the prompt (no other code sets the phase).
    """

    def __init__(self, model, method: Policy, budget: Budget | None = None, reserve: int = 0):
        config = text_config(model.config)
        num_layers = config.num_hidden_layers
        query_heads = getattr(config, "num_attention_heads", None)
        self.shape = ModelShape(num_layers, query_heads, getattr(config, "num_key_value_heads", None) or query_heads)
        windows = layer_windows(model.config)
        super().__init__(layers=[CompressedLayer(self, i, windows[i]) for i in range(num_layers)])
        self.position_layer = next((i for i, window in enumerate(windows) if window is None), 0)
        self.position_end = 0  # the position after the newest token given to the model
        self.method = method
        self.budget_spec = budget or Budget()
        self.allocation: tuple[int | None, int, int] | None = None  # (C, sinks, recent), set at the prompt
        self.reserve = reserve
        self.phase = "prefill"
        self.shifted = method.positions == "shifted"
        # a compact store after the prompt (method.quant: KIVI, method.key_channels: ThinK); decided once
        self.compact = method.quant != "none" or bool(method.key_channels)
        # the model's RoPE: `shifted` rotates keys with it; a method asking for queries before RoPE undoes it
        decoder = model.get_decoder() if self.shifted or hasattr(model, "get_decoder") else None
        self.rotary = decoder.rotary_emb if self.shifted else getattr(decoder, "rotary_emb", None)
        self.prompt_len: int | None = None
        self.span: tuple[int, int] = (0, 0)  # phase "reconstruct": the prompt positions the pass repeats
        self.room = 0  # slots a layer keeps free after the prompt for the reconstruction passes

    def first_capacity(self, n: int) -> int:
        """Slots to allocate at a layer's first write of `n` tokens: room for what it will hold, so a
        prompt that fits its budget is never copied into doubled buffers at the first decoded token."""
        method = self.method
        if not method.compresses or self.room:
            return n + self.room + self.reserve
        budget = method.allocate(self.budget_spec, n)[0] if self.phase == "prefill" else None
        if budget is None:
            return n + self.reserve
        if n > budget:
            return n  # compacted into fresh buffers right after its attention
        if method.stage == "decode":  # never holds more than budget + 1
            return min(n + self.reserve, budget + 1) if self.reserve else budget + 1
        return n + self.reserve

    # -- driving
    def next_position_ids(self, q_len: int) -> torch.Tensor:
        """Position ids (1, q_len) for the next tokens: continue counting, or, if shifted, the cache length
        of the first full-attention layer (of the first layer on a model whose every layer slides)."""
        first = self.layers[self.position_layer]
        start = first.length if self.shifted else first.seen
        self.position_end = start + q_len
        device = first.device if first.is_initialized else None
        return torch.arange(start, start + q_len, device=device)[None]

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor, layer_type: str = "full_attention") -> torch.Tensor:
        """RoPE-rotate each key by its own position delta (batch, heads, n); exact for any rope_type, with the
        layer type's own frequencies where a model has one RoPE per layer type (Gemma 3)."""
        b, h, n, d = keys.shape
        per_type = hasattr(self.rotary, f"{layer_type}_inv_freq")
        if per_type:
            cos, sin = self.rotary(keys, delta.reshape(1, -1), layer_type)
            scale = getattr(self.rotary, f"{layer_type}_attention_scaling", 1.0) or 1.0
        else:
            cos, sin = self.rotary(keys, delta.reshape(1, -1))
            scale = getattr(self.rotary, "attention_scaling", 1.0) or 1.0
        if cos.shape[-1] != d:  # half-width tables (gpt-oss): the same rotation of the two halves
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        cos = (cos / scale).view(b, h, n, d).to(keys.dtype)
        sin = (sin / scale).view(b, h, n, d).to(keys.dtype)
        return keys * cos + rotate_half(keys) * sin

    def _allocate(self, layer: CompressedLayer, stats: Stats | None = None) -> tuple[int | None, int, int]:
        """The method's allocation for the prompt (once), and with the prompt's `stats` the method's choice
        for this layer (once), as it applies to `layer` (see its `allocation`)."""
        if self.allocation is None:
            self.allocation = self.method.allocate(self.budget_spec, self.prompt_len)
        if stats is not None and layer.own_allocation is None:
            self._layer_allocations(layer, stats)
        return layer.allocation

    def _layer_allocations(self, layer: CompressedLayer, stats: Stats) -> None:
        """The method's per-layer budgets at `layer`'s prompt cut; earlier layers given less are cut again."""
        allocations = self.method.layer_allocations(self.layers[: layer.layer_idx + 1], stats, self.allocation,
                                                    self.shape)
        if allocations is None:
            return
        *earlier, layer.own_allocation = allocations
        for other, allocation in zip(self.layers, earlier):
            if allocation is None or allocation == other.own_allocation:
                continue
            other.own_allocation = allocation
            budget, sinks, recent = other.allocation
            if budget is not None and other.ragged is None and other.length > budget:
                scores = self.method.recut_scores(other)
                other.compact(select(other, scores, budget, sinks, recent), 1 if self.method.stage == "decode"
                              else self.reserve)
                other.gaps = other.gaps or bool(other.window) and scores is not None  # mask by positions

    def _compact_store(self, layer: CompressedLayer, stats: Stats) -> QuantizedKV | PrunedKeys | None:
        """The store `layer` moves to after the prompt: ThinK's kept key channels (chosen from the prompt's
        queries; None without a prompt, in a stream), or KIVI's quantized KV (its attention was in full precision)."""
        method = self.method
        if method.key_channels:
            return PrunedKeys(method.kept_channels(layer, stats)) if stats.window_queries is not None else None
        self._check_group(layer.keys.shape[-1])
        return QuantizedKV(BITS[method.quant], method.quant_group, method.quant_residual)

    def _check_group(self, head_dim: int) -> None:
        if head_dim % self.method.quant_group:
            raise KVBenchError(f"method.quant_group={self.method.quant_group} must divide the model's head dim "
                               f"{head_dim}: set method.quant_group to a divisor of it")

    # -- called by kvbench_attention after each layer's attention
    def stats_request(self, layer_idx: int, q_len: int) -> StatsRequest:
        return self.method.statistics(self.phase)

    def after_attention(self, layer_idx: int, stats: Stats) -> None:
        layer = self.layers[layer_idx]
        if self.phase == "reconstruct":
            self._reconstruction_pass(layer, stats)
            return
        if self.phase == "prefill" and self.prompt_len is None:
            self.prompt_len = layer.seen  # before any window cut
        if layer.window and self.phase == "prefill" and layer.length > layer.window - 1:
            # the model's own rule first: a sliding layer keeps the last window - 1 tokens (no method hook
            # sees the others); the method then works inside the window on the statistics of those tokens
            layer.compact(torch.arange(layer.length - layer.window + 1, layer.length, device=layer.device)
                          .expand(*layer.keys.shape[:2], -1), extra=1)
            stats = stats.last(layer.length)
        if self.method.compresses:
            self._compress(layer, stats)
        while layer.window and layer.length > layer.window - 1:  # a decode step: the oldest left the window
            victim = layer.oldest_in_ring(0)
            layer.evict(oldest(layer, 0) if victim is None else victim)
        if self.compact and layer.store is None and layer.ragged is None and not layer.window and layer.length \
                and not self.room:  # (a reconstructing method's layers stay whole until its passes end)
            store = self._compact_store(layer, stats)  # after the prompt's cut; a sliding layer keeps its window
            if store is not None:
                layer.to_store(store)

    def _compress(self, layer: CompressedLayer, stats: Stats) -> None:
        method = self.method
        if self.phase == "prefill":
            budget, sinks, recent = self._allocate(layer, stats)
            if layer.window and method.per_head or self.room:
                # per-head budgets compress the full-attention layers, a sliding layer keeps its window; a
                # reconstructing method cuts every layer after its passes (`cut_reconstructed`)
                return
            if method.reconstructs and budget is not None and layer.length > budget:
                raise KVBenchError(f"{method.name} is scored by passes after the prompt that a Session runs: drive "
                                   "the cache with kvbench.engine.Session(..., repeat=...)")
            if budget is None and layer.capacity < layer.length + self.reserve:  # the method left it whole
                layer.compact(torch.arange(layer.length, device=layer.device).expand(*layer.keys.shape[:2], -1),
                              self.reserve)
                return
            scores = method.prefill_scores(layer, stats)
            if budget is not None and layer.length > budget and method.per_head:
                if sinks or recent:  # protected in every head (each query head's, gqa: expand), whatever its budget
                    protected = layer.protected(sinks, recent)
                    protected = protected.repeat_interleave(scores.shape[1] // protected.shape[1], dim=1)
                    scores = scores.float().masked_fill(protected, float("inf"))
                budgets = method.head_budgets(layer.layer_idx, scores, budget, self.shape)
                scores = method.cut_scores(layer, stats, scores, budgets)
                layer.to_ragged(select_per_head(scores, budgets), self.reserve)
                if method.key_channels:  # ThinK on per-head budgets: each segment's kept key channels
                    ragged = layer.ragged
                    ragged.prune_keys(method.kept_channels(layer, stats, (ragged.prefix_keys, ragged.lens)))
            elif budget is not None and layer.length > budget:
                extra = 1 if method.stage == "decode" else self.reserve
                scores = method.cut_scores(layer, stats, scores, budget, layer.protected(sinks, recent))
                keep = select(layer, scores, budget, sinks, recent, method.chunk)
                method.before_compact(layer, keep)
                layer.compact(keep, extra)
                layer.gaps = bool(layer.window) and scores is not None
        elif method.stage == "decode":
            budget, sinks, recent = self._allocate(layer)
            method.decode_update(layer, stats)
            while budget is not None and layer.length > budget:
                scores = method.eviction_scores(layer)
                if scores is None:  # recency: from the ring in O(1), or a search of the positions
                    victim = layer.oldest_in_ring(sinks)
                    victim = oldest(layer, sinks) if victim is None else victim
                else:
                    if layer.window:  # a token that left the window goes first (it is no longer seen)
                        scores = scores.masked_fill(layer.view("pos") <= layer.seen - layer.window, float("-inf"))
                        layer.gaps = True
                    victim = lowest(layer, scores, sinks, recent)
                method.before_evict(layer, victim, scores)
                if isinstance(victim, Victim):
                    layer.evict(victim.slot, victim.pos)
                else:
                    layer.evict(victim, sinks=sinks)

    # -- a method that reconstructs the prompt (KVzip): the Session's passes, then one cut of every layer
    def _reconstruction_pass(self, layer: CompressedLayer, stats: Stats) -> None:
        """After a pass's attention: the method scores the prompt's chunk `span` from the pass's queries (a
        full-attention layer), and the pass's tokens leave the layer (the prompt's slots are untouched)."""
        queries = stats.window_queries
        if not layer.window:
            start, end = self.span
            if "reconstructed" not in layer.notes:
                layer.notes["reconstructed"] = torch.zeros(*layer.keys.shape[:2], self.prompt_len,
                                                           device=layer.device)
            layer.notes["reconstructed"][..., start:end] = self.method.reconstruction_scores(layer, queries, self.span)
        layer.length -= queries.shape[2]
        layer.seen -= queries.shape[2]

    def cut_reconstructed(self, prefix: int) -> None:
        """Cut every full-attention layer to the method's per-head budgets from the passes' scores (a sliding
        layer keeps its window); the scores are then dropped."""
        layers = [layer for layer in self.layers if not layer.window]
        scores = [layer.notes.pop("reconstructed") for layer in layers]
        budgets = self.method.reconstructed_budgets(scores, prefix, self.allocation[0])
        for layer, score, budget in zip(layers, scores, budgets, strict=True):
            layer.to_ragged(select_per_head(score, budget), self.reserve)
        self.room = 0

    # -- accounting
    def kv_summary(self) -> dict:
        """Tokens and bytes stored per sequence vs the model's own cache (which keeps a sliding layer's last
        window - 1 tokens), kept tokens per layer and head, and per layer type: its layers, window, budget
        and mean kept tokens per head."""
        kept_tokens = full_tokens = kept_bytes = full_bytes = peak_tokens = 0
        per_layer, by_type = [], {}
        for layer in self.layers:
            kept = layer.kept_per_head()
            if kept is None:
                continue
            per_token = layer.bytes_per_token()
            full = layer.kv_heads * (min(layer.seen, layer.window - 1) if layer.window else layer.seen)
            kept_tokens += sum(kept)
            full_tokens += full
            peak_tokens += max(sum(kept), layer.peak * len(kept))  # a ragged store only grows after its prompt
            kept_bytes += layer.kept_bytes()
            full_bytes += full * per_token
            per_layer.append(kept)
            budget = layer.allocation[0] if self.method.compresses and layer.allocation else None
            if layer.window and self.method.per_head:
                budget = layer.window - 1  # per-head budgets leave a sliding layer its window
            kind = by_type.setdefault(layer.layer_type, {"layers": 0, "window": layer.window, "budget": budget,
                                                         "kept_per_head": 0.0})
            kind["layers"] += 1
            kind["kept_per_head"] += sum(kept) / len(kept)
        for kind in by_type.values():
            kind["kept_per_head"] = round(kind["kept_per_head"] / kind["layers"], 2)
        return {
            "kv_kept_tokens": kept_tokens,
            "kv_full_tokens": full_tokens,
            "kv_kept_bytes": kept_bytes,
            "kv_full_bytes": full_bytes,
            "kv_peak_tokens": peak_tokens,  # the most tokens held at once, summed over layers and heads
            "kv_kept_per_layer_head": per_layer,
            "kv_seen_tokens": max((layer.seen for layer in self.layers), default=0),
            "kv_layer_types": by_type,
        }
