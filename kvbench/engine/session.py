"""Session: the one driver of a compressed cache — a prompt's prefill, then decode steps.

    session = Session(model, policy, Budget(tokens=128), reserve=32)   # model: kvbench's attention installed
    logits = session.prefill(prompt_ids)          # forward the prompt; the policy compresses it layer by layer
    logits = session.step(next_ids)               # one decode step (the policy holds its budget, if it decodes)
    tokens = Session(model, policy, budget).generate(prompt_ids, max_new_tokens=32)   # greedy, both of the above

    session = Session(model, policy, budget, stream=True)   # no prompt: every token is a decode step (perplexity)

The cache's phase is set here and nowhere else: `prefill()` runs once, before any `step()`; a second
prefill, or a step before it, is an error rather than a silently different result. Positions are the
cache's (`original` keeps counting, `shifted` uses the cache length).
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, replace

import torch

from kvbench.engine.budget import Budget
from kvbench.engine.cache import CompressedCache
from kvbench.engine.types import Policy, RepeatPrompts
from kvbench.errors import KVBenchError


@functools.cache
def _cache_name(forward_fn) -> str:
    names = inspect.signature(forward_fn).parameters
    return "cache" if "cache" in names else "past_key_values"


def cache_argument(model, cache) -> dict:
    """The cache as the keyword the installed transformers' model takes: `cache` (transformers >= 5.25,
    where `past_key_values` is deprecated), else `past_key_values`."""
    return {_cache_name(type(model).forward): cache}


def forward(model, cache: CompressedCache, input_ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
    """One forward pass of `input_ids` (batch, q) through `cache`; the last `logits_to_keep` logits."""
    out = model(
        input_ids=input_ids,
        position_ids=cache.next_position_ids(input_ids.shape[1]).to(input_ids.device),
        **cache_argument(model, cache),
        use_cache=True,
        kvbench_cache=cache,
        logits_to_keep=logits_to_keep,
    )
    return out.logits


@dataclass
class Sampling:
    """Sampling instead of greedy choice: softmax(logits / temperature) cut to the `top_k` tokens and the
    smallest set of probability >= `top_p` (transformers' order: temperature, top-k, top-p), drawn with
    its own generator seeded by `seed`, so a sequence draws the same tokens alone or in a batch."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    generator: torch.Generator | None = None

    def fresh(self) -> Sampling:
        """A copy whose generator starts again from `seed` (one per generation)."""
        return replace(self, generator=None)

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of `logits` (batch, vocab)."""
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        logits = logits.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            before = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)  # mass ranked above each
            cut = (before >= self.top_p).scatter(-1, order, before >= self.top_p)
            logits = logits.masked_fill(cut, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator)[:, 0]


def choose(logits: torch.Tensor, step: int, stops: torch.Tensor, min_new_tokens: int,
           sampling: Sampling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token from the last logits (batch, vocab) at decode `step`: greedy, or drawn by `sampling`;
    (tokens, is_stop), both (batch,). Stop tokens are masked before `min_new_tokens` (in place)."""
    if step < min_new_tokens and len(stops):
        logits[:, stops] = float("-inf")
    token = logits.argmax(dim=-1) if sampling is None else sampling.draw(logits)
    return token, torch.isin(token, stops) if len(stops) else torch.zeros_like(token, dtype=torch.bool)


@dataclass
class Greedy:
    """What `Session.generate` returns: new tokens per sequence (stop token excluded), and when the
    prompt's forward pass ended (perf_counter seconds), with the cache's accounting right after it."""

    tokens: list[list[int]]
    prefill_end: float
    prompt_kv: dict


class Session:
    """One generation (or one stream) of `model` with its KV cache compressed by `policy` to `budget`."""

    def __init__(self, model, policy: Policy, budget: Budget | None = None, reserve: int = 0, stream: bool = False,
                 repeat: RepeatPrompts | None = None):
        self.model = model
        self.cache = CompressedCache(model, policy, budget, reserve=reserve)
        self.repeat = repeat  # a method that reconstructs the prompt (KVzip): the prompts it asks with
        self.prefilled = stream
        if stream:
            self.cache.phase = "decode"  # no prompt: the budget is held from the first token on

    def prefill(self, input_ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        """Forward the prompt (batch, n); returns its last `logits_to_keep` logits. Once per session."""
        if self.prefilled:
            raise RuntimeError("Session.prefill: the prompt is already in this cache (one prefill per session)")
        passes = self._reconstruction_passes(input_ids)
        logits = forward(self.model, self.cache, input_ids, logits_to_keep)
        if passes:  # KVzip: the model repeats the prompt chunk by chunk; then every layer is cut at once
            self.cache.phase = "reconstruct"
            for start, end, ids in passes:
                self.cache.span = (start, end)
                forward(self.model, self.cache, ids)
            self.cache.cut_reconstructed(self.repeat.prefix)
        self.cache.phase = "decode"
        self.prefilled = True
        return logits

    def _reconstruction_passes(self, input_ids: torch.Tensor) -> list:
        """The passes a reconstructing method runs after this prompt (none when it fits its budget), and room
        for the longest in every layer."""
        policy = self.cache.method
        if not policy.reconstructs:
            return []
        budget = policy.allocate(self.cache.budget_spec, input_ids.shape[1])[0]
        if budget is None or input_ids.shape[1] <= budget:
            return []
        if self.repeat is None:
            raise KVBenchError(f"{policy.name} asks the model to repeat the prompt, in words a tokenizer gives: pass "
                               "repeat=kvbench.models.chat.repeat_prompts(tokenizer, method, input_ids) to the Session "
                               "(or to kvbench.compress)")
        passes = policy.reconstruction_passes(input_ids, self.repeat)
        self.cache.room = max(ids.shape[1] for _, _, ids in passes)
        return passes

    def step(self, input_ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        """Forward new tokens (batch, q) after the prompt (or in a stream); returns their last logits."""
        if not self.prefilled:
            raise RuntimeError("Session.step before Session.prefill: forward the prompt first (or stream=True)")
        return forward(self.model, self.cache, input_ids, logits_to_keep)

    def kv_summary(self) -> dict:
        """Tokens and bytes stored vs a full cache, per layer and head (see CompressedCache.kv_summary)."""
        return self.cache.kv_summary()

    @torch.inference_mode()
    def prompt(self, input_ids: torch.Tensor, question_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Forward a prompt and return its last logits. With `question_ids` (query-agnostic compression), the
        policy compresses `input_ids` (the context) alone, and the question is then appended as a block that no
        method scores or evicts (a prefill-stage method is idle after the prefill); it is part of the prompt."""
        logits = self.prefill(input_ids)
        if question_ids is not None and question_ids.shape[1]:
            logits = self.step(question_ids.to(input_ids.device))
        return logits[:, -1]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, stop_token_ids=(), min_new_tokens: int = 0,
                 question_ids: torch.Tensor | None = None, sampling: Sampling | None = None) -> Greedy:
        """Greedy decoding (or `sampling`) of a batch of equal-length prompts (batch, n): at most
        `max_new_tokens` per sequence, a sequence ending at its first stop token (never before
        `min_new_tokens`); `question_ids`: see `prompt`."""
        device = input_ids.device
        batch = input_ids.shape[0]
        stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
        sampling = None if sampling is None else sampling.fresh()
        logits = self.prompt(input_ids, question_ids)
        if device.type == "cuda":  # the prompt's kernels finished: prefill_end times them
            torch.cuda.synchronize(device)
        prefill_end = time.perf_counter()
        prompt_kv = self.kv_summary()  # the prompt alone, as the policy left it
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_token, is_stop = choose(logits, step, stops, min_new_tokens, sampling)
            for i, token in enumerate(next_token.tolist()):
                if not done[i] and not is_stop[i]:
                    tokens[i].append(token)
            done |= is_stop
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self.step(next_token[:, None])[:, -1]
        return Greedy(tokens, prefill_end, prompt_kv)
