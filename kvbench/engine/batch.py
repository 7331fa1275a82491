"""Several generations decoded together, each sequence with its own compressed cache (continuous batching).

    for i, result in decode_together(model, requests, policy, budget, batch_size=8):
        ...   # result.tokens: what Session.generate gives request i alone; yielded as each one finishes

How it batches, and why the results equal batch 1:

- each prompt is prefilled alone (batch 1): its attention, statistics and compression are exactly the
  single-sequence ones, there is no padding to score, keep or count, and a ratio budget is the sequence's
  own. A long prompt's prefill already fills a GPU; the time a batch saves is in decoding, where a batch-1
  step reads every weight to produce one token;
- the decode steps of up to `batch_size` sequences run as one forward pass: projections, MLPs and the LM
  head see (batch, 1) tokens at once, each with its own position; inside each attention layer every
  sequence's attention, statistics and eviction run on its own `CompressedCache` layer (`BatchedCache`),
  so sequences of any length, ragged per-head stores and decode-stage eviction mix freely;
- a sequence leaves the batch at its own stop token or length, and the next prompt takes its place, so no
  step is spent on a finished sequence.

Float32 predictions equal batch 1 token for token (tests/unit/test_batch.py); in half precision a batched
matrix product may round differently than a single row, and agreement is reported, not assumed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.engine.architecture import text_config
from kvbench.engine.budget import Budget
from kvbench.engine.cache import CompressedCache
from kvbench.engine.session import Sampling, Session, choose, forward
from kvbench.engine.types import Policy, RepeatPrompts


class BatchedLayer(CacheLayerMixin):
    """One layer of several sequences' caches: `update` writes each sequence's new tokens into its own
    layer and keeps what each returns (`pending`) for kvbench's attention, which runs per sequence."""

    is_compileable = False
    is_croppable = False

    def __init__(self, members: list):
        super().__init__()
        self.members = members
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.is_initialized = True

    @property
    def is_sliding(self) -> bool:
        return self.members[0].is_sliding

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.pending = [member.update(key_states[b : b + 1], value_states[b : b + 1])
                        for b, member in enumerate(self.members)]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(member.get_mask_sizes(query_length)[0] for member in self.members), 0

    def get_seq_length(self) -> int:
        return max(member.get_seq_length() for member in self.members)

    def get_max_length(self) -> int:
        return -1


class BatchedCache(Cache):
    """The caches of several sequences decoded in one forward pass (kvbench's attention splits it again)."""

    def __init__(self, caches: list[CompressedCache]):
        self.sequences = caches
        super().__init__(layers=[BatchedLayer([cache.layers[i] for cache in caches])
                                 for i in range(len(caches[0].layers))])

    def next_position_ids(self, q_len: int) -> torch.Tensor:
        """Each sequence's own next positions, (batch, q_len)."""
        ids = [cache.next_position_ids(q_len) for cache in self.sequences]
        return torch.cat([i.to(ids[0].device) for i in ids])


@dataclass
class Request:
    """One generation (greedy unless `sampling`): a prompt (1, n), at most `max_new_tokens`, ending at a
    stop token (never before `min_new_tokens`)."""

    input_ids: torch.Tensor
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] | list[int] = ()
    min_new_tokens: int = 0
    question_ids: torch.Tensor | None = None  # appended after the context's compression (query-agnostic)
    sampling: Sampling | None = None  # None: greedy; its own generator, so alone and batched draw alike
    repeat: RepeatPrompts | None = None  # a method that reconstructs the prompt (KVzip): what it asks the model


@dataclass
class Decoded:
    """A finished request: its new tokens (stop excluded), its session, and its times (perf_counter):
    start of its prefill, end of its prefill, end of its last step; the cache right after the prompt."""

    tokens: list[int]
    session: Session
    start: float
    prefill_end: float
    end: float = 0.0
    prompt_kv: dict = field(default_factory=dict)


@dataclass
class _Active:
    index: int
    request: Request
    stops: torch.Tensor
    decoded: Decoded
    logits: torch.Tensor  # (1, vocab): the logits of the next token
    step: int = 0
    sampling: Sampling | None = None  # the request's, with its own generator


@torch.inference_mode()
def decode_together(model, requests: Iterable[Request], policy: Policy, budget: Budget | None = None,
                    batch_size: int = 8, admit: Callable[[Request, int], bool] | None = None,
                    ) -> Iterator[tuple[int, Decoded]]:
    """Greedy decoding of `requests`, up to `batch_size` sequences per decode step; yields (index of the
    request, Decoded) as each finishes, so a caller writes its record at once. Each sequence's tokens are
    those of `Session(...).generate` on it alone (see the module docstring). `admit(request, active)`, when
    given, says whether the next request may join `active` running sequences now (memory); it waits if not
    (a request always runs when nothing else does)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = next(model.parameters()).device
    pending = enumerate(requests)
    active: list[_Active] = []
    batched: BatchedCache | None = None  # rebuilt only when the set of sequences changes
    waiting = next(pending, None)
    while active or waiting is not None:
        while waiting is not None and len(active) < batch_size and (
                not active or admit is None or admit(waiting[1], len(active))):
            active.append(_prefill(model, *waiting, policy, budget, device))  # refill: one prompt at a time
            waiting = next(pending, None)
        stepping = []
        for seq in active:  # choose each sequence's token; finished ones leave the batch
            token, is_stop = choose(seq.logits, seq.step, seq.stops, seq.request.min_new_tokens, seq.sampling)
            token_id, stopped = torch.cat([token, is_stop.long()]).tolist()  # one read from the device
            if not stopped:
                seq.decoded.tokens.append(token_id)
            if stopped or seq.step == seq.request.max_new_tokens - 1:
                seq.decoded.end = _now(device)
                yield seq.index, seq.decoded
            else:
                stepping.append((seq, token))
        active = [seq for seq, _ in stepping]
        if not stepping:
            continue
        ids = torch.stack([token for _, token in stepping])  # (batch, 1)
        caches = [seq.decoded.session.cache for seq in active]
        if len(caches) == 1:  # one sequence left: its own cache, exactly the batch-1 path
            logits = forward(model, caches[0], ids)[:, -1]
        else:
            if batched is None or batched.sequences != caches:
                batched = BatchedCache(caches)
            logits = forward(model, batched, ids)[:, -1]
        for b, seq in enumerate(active):
            seq.logits = logits[b : b + 1]
            seq.step += 1


def _prefill(model, index: int, request: Request, policy, budget, device) -> _Active:
    if request.max_new_tokens < 1:
        raise ValueError(f"request {index}: max_new_tokens={request.max_new_tokens} must be >= 1")
    start = time.perf_counter()
    question = request.question_ids
    session = Session(model, policy, budget, reserve=request.max_new_tokens + (0 if question is None else question.shape[1]),
                      repeat=request.repeat)
    logits = session.prompt(request.input_ids.to(device), question)
    decoded = Decoded([], session, start, _now(device), prompt_kv=session.kv_summary())
    stops = torch.tensor(sorted(set(request.stop_token_ids)), dtype=torch.long, device=device)
    sampling = None if request.sampling is None else request.sampling.fresh()
    return _Active(index, request, stops, decoded, logits, sampling=sampling)


def _now(device) -> float:
    if device.type == "cuda":  # the kernels launched so far finished: the time is theirs
        torch.cuda.synchronize(device)
    return time.perf_counter()


AUTO_BATCH = {"cuda": 16, "cpu": 8}  # batch_size=auto: at most this many sequences per decode step


def free_memory(device) -> int | None:
    """Bytes free now on `device` (the GPU's, or the machine's available memory), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def batch_plan(model, batch_size: int | str, device) -> tuple[int, object]:
    """(most sequences per decode step, a function saying whether one more request fits now, or None).

    `auto` is up to AUTO_BATCH sequences (16 on a GPU, 8 on the CPU, where decoding 8 together doubles
    SmolLM2's throughput: docs/performance.md) while the free memory holds twice a new sequence's full-cache K
    and V (prompt + new tokens): its prefill's working memory and its cache, as no method keeps more."""
    if batch_size != "auto":
        size = int(batch_size)
        if size < 1:
            raise ValueError(f"run.batch_size={batch_size} must be >= 1 or auto")
        return size, None
    config = text_config(model.config)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()

    def admit(request: Request, active: int) -> bool:
        free = free_memory(device)
        question = 0 if request.question_ids is None else request.question_ids.shape[1]
        return free is None or free > 2 * per_token * (request.input_ids.shape[1] + question + request.max_new_tokens)

    return AUTO_BATCH.get(device.type, 1), admit
