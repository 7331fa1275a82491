"""Estimate DuoAttention head patterns (arXiv:2410.10819) for a causal LM, in DuoAttention's published layout.

    python scripts/estimate_duo_patterns.py --model meta-llama/Llama-3.2-3B-Instruct --haystack booksum.jsonl
    python scripts/estimate_duo_patterns.py --model qwen2.5-7b-instruct --ctx-max 16000 --steps 1000
    python scripts/estimate_duo_patterns.py --model tiny-random --device cpu --steps 20 --ctx-min 600 --ctx-max 900 \
        --num-passkeys 2 --passkey-length 4 --sink-size 4 --recent-size 16 --buffer 16     # a CPU smoke run

`--model` is a configs/model name (tiny, tiny-random, smollm2-135m, llama3.1-8b-instruct, ...), a hub id or a
local model folder (loaded through kvbench.models). Writes `--out` (default results/duo_patterns/<model name>,
where `method=duo_attention` looks by default) holding `full_attention_heads.tsv` (tab-separated, one row per
layer, one column per KV head, np.savetxt's "%.18e") and `config.json` (the run's settings under DuoAttention's
argument names: sink_size, recent_size, lr, reg_weight, ...), the layout kvbench.methods.duo_attention reads.

The rules are DuoAttention's training code (mit-han-lab/duo-attention, commit fe93c31; file:line below):

- trained: one gate alpha per KV head and layer, initialised to `--initial-value` 1.0 (patch/llama.py:478-489,
  utils.py:43); every model weight frozen (train.py:283-292); alpha clamped to [0, 1] in place before every
  step (train.py:98-102) and inside the forward (patch/llama.py:120-125); a GQA group's query heads share
  their KV head's gate (patch/llama.py:122-125);
- two-way forward (train.py:106-127, patch/llama.py:41-143): the original model, with full causal attention
  and no gradient, gives the teacher; in the student every head outputs
      o_h = (1 - alpha) * streaming_attention_h(student q, k, v) + alpha * full_attention_h(teacher q, k, v)
  before o_proj (patch/llama.py:120-136): the full branch is the *teacher's* attention output of that layer
  (computed under no_grad from the original hidden states), the streaming branch the student's own;
- streaming attention (sink + recent, causal): `--streaming-attn blocksparse` (the reference default,
  utils.py:56, used by every published run: config.json's streaming_attn_implementation) is Block-Sparse-
  Attention's streaming kernel: query i sees key j <= i when j's 128-token block is one of the first
  ceil(sink/128) blocks or one of the ceil(recent/128) blocks ending at i's block (patch/llama.py:450-462,
  patch/streaming_attn.py:81-108; the mask of mit-han-lab/Block-Sparse-Attention's tests,
  block_sparse_tests/fwd_bwd/test_correctness/utils.py generate_streaming_mask); `--streaming-attn sdpa` is
  the reference's token mask: j <= i and (j < sink or i - j < recent) (patch/streaming_attn.py:14-43);
- loss (train.py:129-156, loss.py:1-4): on the final hidden states (the decoder's output after its last norm:
  train.py:283 trains `model.model`) at the labelled positions (every token of the questions-and-answers
  part, data.py:244-270), in float32,
      distill = sum_t mean_d (h_teacher[t, d] - h_student[t, d])^2 / n_labelled
      reg     = sum |alpha| / (layers * kv_heads)              (l1_loss over all gates at once)
      loss    = distill + reg_weight * reg
- optimiser: AdamW(lr, weight_decay=0) on the gates (train.py:344), lr 0.02 and reg_weight 0.05 (the
  published runs, scripts/train.sh:21-23 via run_train.sh), 2000 steps of batch 1, lr factor
  min(1, max((s + 1) / (N // 5), 0.1), max((N - s) / (N // 5), 0.1)) at step s of N (train.py:346-353),
  seed 42 (utils.py:78);
- data: MultiplePasskeyRetrievalDataset (data.py:18-270) with the published settings (scripts/train.sh):
  contexts of linspace(ctx_min, ctx_max, 50) haystack tokens (int), shuffled each epoch (data.py:110-115,
  301-313); 10 passkeys of 32 words of the NATO alphabet, each behind the needle "Remeber [sic] this
  sequence of words, it's the <ordinal> passkey to the vault: " at depths drawn without replacement from
  linspace(0.05, 0.95, 1000) and sorted, each needle wrapped in "\\n\\n" (data.py:193-242); the book between
  "<|im_start|> This is a very long story book: <book> " (with the tokenizer's special tokens) and
  " </book>.\\n\\n", padded before that with the haystack's last tokens to a multiple of 16 (the reference's
  test is always true, so 1..16 tokens, data.py:255-261); then for each passkey "Based on the content of the
  book, what is the <ordinal> passkey to the vault?\\nPasskey: " + passkey + "\\n\\n", all labelled; the
  haystack is the texts concatenated until ctx_max tokens, cut to ctx_max - buffer (300) - the other tokens
  of a sample (data.py:125-132, 159-181); every piece tokenised on its own and joined as token lists;
- output: np.savetxt(tab) of the gates, one row per layer (utils.py:376-381, train.py:399-412), and
  config.json with the run's settings (train.py:355-363); sink_size 128 and recent_size 256 by default
  (scripts/train.sh:19-20; kvbench's method reads them from config.json).

Documented differences from the reference, and why:
- one process, no flash-attn, no sequence parallelism (Ulysses), no FSDP: the full branch is torch's
  scaled_dot_product_attention (causal), the streaming branch plain torch in query blocks holding only the
  sink and window keys (exact masks, float32 softmax); both branches of the sdpa/blocksparse choices are the
  same masks as the reference kernels, computed differently;
- the teacher and the student run as two forwards (the teacher first, keeping each layer's attention output)
  rather than one forward of a doubled batch: the same arithmetic, less memory;
- the gates are float32 (the reference's are in the model's dtype, bf16); the lr schedule uses
  max(1, N // 5) (the reference divides by zero below 5 steps); the saved table is clipped to [0, 1] (the
  reference saves the value after the last step unclipped and clips on load, utils.py:326-336: the same
  pattern once loaded);
- activation checkpointing per decoder layer (train.py:302) is on unless --no-checkpointing;
- contexts: ctx_max defaults to min(32000, the model's max_prompt_tokens or max_position_embeddings, what the
  haystack holds); kvbench's own prose (kvbench/assets/haystack.txt, about 14k words) is the default haystack
  where the reference uses BookSum (datasets/booksum.jsonl.zst): pass --haystack (a text file, or a .jsonl /
  .json / .parquet of texts, field --text-field) for contexts as long as the published 32000;
- a layer's own sliding window, if the model has one, applies to both branches (the reference ignores
  windows: Llama and Mistral v0.2/v0.3 have none); models with logit softcapping or attention sinks are
  refused (the reference trains Llama and Mistral only);
- no resume, checkpoints every 50 steps, W&B plots or gradient accumulation (1 in the published runs);
  the data draws come from one seeded torch.Generator (the reference's DataLoader workers draw their own).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvbench import models
from kvbench.engine.attention import attention_function
from kvbench.errors import KVBenchError
from kvbench.methods.duo_attention import PATTERN_FILE
from kvbench.models.loading import model_config

HAYSTACK = Path(__file__).resolve().parents[1] / "kvbench" / "assets" / "haystack.txt"
PROBE = "kvbench_duo_train"
REFERENCE = "mit-han-lab/duo-attention@fe93c31 duo_attn/train.py"
STREAMING = ("blocksparse", "sdpa")  # the reference's --streaming_attn_implementation values
DEFAULT_CTX_MAX = 32000  # scripts/run_train.sh: ctx=1000_32000

# duo_attn/data.py:19-82, transcribed
PASSKEY_ALPHABET = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
                    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
                    "uniform", "victor", "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth",
            "nineteenth", "twentieth")
NEEDLE = "Remeber this sequence of words, it's the {ordinal} passkey to the vault: "  # [sic], as the reference
QUESTION = "Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
PROMPT_OPEN = "<|im_start|> This is a very long story book: <book> "
PROMPT_CLOSE = " </book>.\n\n"
SEPARATOR = "\n\n"
PAD_MULTIPLE = 16


# ----------------------------------------------------------------------------- attention


def streaming_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int, block: int | None,
                      window: int | None = None) -> torch.Tensor:
    """Boolean (q, k): query at q_pos sees key at k_pos in a streaming head. block None: the reference's token
    mask (j <= i and (j < sink or i - j < recent)); block b: Block-Sparse-Attention's streaming blocks (the
    first ceil(sink / b) blocks and the ceil(recent / b) blocks ending at the query's block, causal inside)."""
    q, k = q_pos[:, None], k_pos[None, :]
    if block is None:
        near = (k < sink) | (q - k < recent)
    else:
        near = (k // block < math.ceil(sink / block)) | (q // block - k // block < math.ceil(recent / block))
    seen = near & (k <= q)
    if window:
        seen &= k > q - window
    return seen


def full_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    q, k = q_pos[:, None], k_pos[None, :]
    seen = k <= q
    if window:
        seen &= k > q - window
    return seen


def streaming_span(start: int, end: int, sink: int, recent: int, block: int | None, device) -> torch.Tensor:
    """The key positions a streaming head may need for queries start..end-1: the sinks and the window of the
    first query onwards (the mask then picks exactly)."""
    if block is None:
        sink_end, low = sink, max(0, start - recent + 1)
    else:
        sink_end = math.ceil(sink / block) * block
        low = max(0, (start // block - math.ceil(recent / block) + 1) * block)
    return torch.cat([torch.arange(0, min(sink_end, low), device=device), torch.arange(low, end, device=device)])


def blocked_attention(query, key, value, scaling: float, span, visible, query_block: int = 512) -> torch.Tensor:
    """softmax(q.k * scaling) v over the visible keys, per query block; query (B, Hq, n, D), key/value
    (B, Hkv, n, D) (query head h reads KV head h // (Hq / Hkv)); span(start, end) -> key positions to load,
    visible(q_pos, k_pos) -> bool mask. Float32 logits and softmax (float64 for a float64 model); returns
    (B, n, Hq, D) in query's dtype."""
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    work = torch.promote_types(query.dtype, torch.float32)
    outs = []
    for start in range(0, n, query_block):
        end = min(n, start + query_block)
        keys = span(start, end)
        q = query[:, :, start:end].to(work).reshape(batch, kv_heads, groups, end - start, dim)
        k = key.index_select(2, keys).to(work)
        v = value.index_select(2, keys).to(work)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scaling
        mask = visible(torch.arange(start, end, device=query.device), keys)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        outs.append(torch.einsum("bhgqk,bhkd->bhgqd", probs, v).reshape(batch, heads, end - start, dim))
    return torch.cat(outs, dim=2).transpose(1, 2).to(query.dtype)


def full_attention(query, key, value, scaling: float, window: int | None = None, query_block: int = 512):
    """Causal attention of every head (the layer's own window, if any): (B, n, Hq, D)."""
    if window:
        return blocked_attention(query, key, value, scaling,
                                 lambda s, e: torch.arange(max(0, s - window + 1), e, device=query.device),
                                 partial(full_visible, window=window), query_block)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling).transpose(1, 2)


def streaming_attention(query, key, value, scaling: float, sink: int, recent: int, block: int | None,
                        window: int | None = None, query_block: int = 512):
    """Sink + recent attention of every head (see streaming_visible): (B, n, Hq, D)."""
    return blocked_attention(query, key, value, scaling,
                             partial(streaming_span, sink=sink, recent=recent, block=block, device=query.device),
                             partial(streaming_visible, sink=sink, recent=recent, block=block, window=window),
                             query_block)


def mix(streaming: torch.Tensor, full: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - a) * streaming + a * full per query head, a = clamp(alpha, 0, 1) of its KV head; streaming/full
    (B, n, Hq, D), alpha (Hkv,). In float32 at least, returned in streaming's dtype."""
    heads = streaming.shape[2]
    work = torch.promote_types(streaming.dtype, torch.float32)
    a = alpha.clamp(0, 1).to(work).repeat_interleave(heads // alpha.shape[0]).view(1, 1, heads, 1)
    return ((1 - a) * streaming.to(work) + a * full.to(work)).to(streaming.dtype)


class DuoTraining:
    """The attention function of a training step (registered through transformers' AttentionInterface).

    `teacher = True`: full causal attention, no gradient; each layer's output is kept. `teacher = False` (the
    student): mix(streaming attention of the student's own q, k, v, the teacher's output of that layer, the
    layer's gates)."""

    def __init__(self, gates: torch.Tensor, sink: int, recent: int, block: int | None, query_block: int = 512):
        self.gates, self.sink, self.recent, self.block, self.query_block = gates, sink, recent, block, query_block
        self.teacher = True
        self.full: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
            raise KVBenchError("this model's attention uses logit softcapping or attention sinks, which DuoAttention's "
                               "training (Llama and Mistral) does not define: estimate patterns for another model")
        if query.shape[0] != 1:
            raise KVBenchError("DuoAttention's training runs one sequence at a time (batch size 1)")
        layer = module.layer_idx
        if key.shape[1] != self.gates.shape[1]:
            raise KVBenchError(f"layer {layer} has {key.shape[1]} KV heads but the gates have {self.gates.shape[1]}")
        window = kwargs.get("sliding_window") or None
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if self.teacher:
            with torch.no_grad():
                out = full_attention(query, key, value, scaling, window, self.query_block)
            self.full[layer] = out
            return out, None
        streaming = streaming_attention(query, key, value, scaling, self.sink, self.recent, self.block, window,
                                        self.query_block)
        return mix(streaming, self.full[layer], self.gates[layer]), None


# ----------------------------------------------------------------------------- loss and schedule


def duo_loss(teacher: torch.Tensor, student: torch.Tensor, gates: torch.Tensor, reg_weight: float):
    """(loss, distill, reg): teacher/student (n_labelled, hidden) final hidden states at the labelled tokens,
    gates (layers, kv_heads). distill = sum_t mean_d (teacher - student)^2 / n_labelled (float32),
    reg = mean |gates|, loss = distill + reg_weight * reg (train.py:136-156, loss.py)."""
    work = torch.promote_types(student.dtype, torch.float32)  # float32 (float64 for a float64 model)
    distill = (teacher.to(work) - student.to(work)).pow(2).mean(dim=-1).sum() / teacher.shape[0]
    reg = gates.to(work).abs().sum() / gates.numel()
    return distill + reg_weight * reg, distill, reg


def lr_factor(step: int, steps: int) -> float:
    """The reference's LambdaLR factor (train.py:346-353): warm-up and decay over a fifth of the steps each,
    floored at 0.1 (N // 5 taken at least 1)."""
    fifth = max(1, steps // 5)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


# ----------------------------------------------------------------------------- data


@dataclass
class DataSettings:
    num_passkeys: int = 10
    passkey_length: int = 32
    ctx_min: int = 1000
    ctx_max: int = DEFAULT_CTX_MAX
    ctx_intervals: int = 50
    depth_intervals: int = 1000
    min_depth: float = 0.05
    max_depth: float = 0.95
    buffer: int = 300


class PasskeyData:
    """DuoAttention's MultiplePasskeyRetrievalDataset (data.py:18-270) on token lists."""

    def __init__(self, tokenizer, settings: DataSettings, generator: torch.Generator):
        self.tokenizer, self.settings, self.generator = tokenizer, settings, generator
        count = settings.num_passkeys
        self.lengths = torch.linspace(settings.ctx_min, settings.ctx_max, settings.ctx_intervals, dtype=torch.int)
        self.depths = torch.linspace(settings.min_depth, settings.max_depth, settings.depth_intervals)
        self.needles = [self.encode(NEEDLE.format(ordinal=o)) for o in ORDINALS[:count]]
        self.questions = [self.encode(QUESTION.format(ordinal=o)) for o in ORDINALS[:count]]
        self.separator = self.encode(SEPARATOR)
        self.open = self.encode(PROMPT_OPEN, special=True)
        self.close = self.encode(PROMPT_CLOSE)
        key = self.encode(self.passkey())  # one drawn passkey sizes the rest (data.py:159-174)
        self.other = len(self.open) + len(self.close) + count * (
            2 * len(self.separator) + len(self.needles[0]) + len(key) + len(self.questions[0]) + len(key))
        self.haystack: list[int] = []

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special)

    @property
    def room(self) -> int:
        """Haystack tokens a sample may hold: ctx_max - buffer - the other tokens (data.py:175-181)."""
        return self.settings.ctx_max - self.settings.buffer - self.other

    def passkey(self) -> str:
        words = torch.randint(0, len(PASSKEY_ALPHABET), (self.settings.passkey_length,), generator=self.generator)
        return " ".join(PASSKEY_ALPHABET[i] for i in words.tolist())

    def set_haystack(self, ids: list[int]) -> None:
        self.haystack = list(ids[: self.room])

    def epoch(self) -> list[int]:
        """The context lengths of one epoch, shuffled (DataLoader(shuffle=True) over the 50 lengths)."""
        order = torch.randperm(len(self.lengths), generator=self.generator)
        return [int(self.lengths[i]) for i in order]

    def sample(self, length: int) -> tuple[torch.Tensor, int]:
        """(input ids (n,), the first labelled position): data.py:193-270."""
        count = self.settings.num_passkeys
        picks = torch.randperm(len(self.depths), generator=self.generator)[:count]
        depths = self.depths[picks].sort().values
        keys = [self.encode(self.passkey()) for _ in range(count)]
        hay = self.haystack[:length]
        context: list[int] = []
        last = 0
        for i, (depth, key) in enumerate(zip(depths, keys, strict=True)):
            point = int(len(hay) * depth)
            context += hay[last:point] + self.separator + self.needles[i] + key + self.separator
            last = point
        context += hay[last:]
        qa = [token for i, key in enumerate(keys) for token in self.questions[i] + key + self.separator]
        context = self.open + context
        pad = PAD_MULTIPLE - (len(context) + len(qa) + len(self.close)) % PAD_MULTIPLE  # 1..16 (data.py:255-261)
        context += self.haystack[-pad:]
        context += self.close
        return torch.tensor(context + qa), len(context)


def read_texts(path: Path, field: str = "text") -> Iterator[str]:
    """The texts of a haystack file: a .jsonl / .json (objects with `field`, or strings), a .parquet (column
    `field`), a .jsonl.zst (needs zstandard), or any other file as plain text (split after blank lines, so a
    long file is read only as far as needed)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pandas as pd

        try:
            column = pd.read_parquet(path, columns=[field])[field]
        except (KeyError, ValueError) as err:
            raise KVBenchError(f"--haystack {path} has no column '{field}': set --text-field to its text column"
                               ) from err
        yield from (str(x) for x in column)
        return
    if name.endswith((".jsonl", ".json", ".jsonl.zst", ".json.zst")):
        if name.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise KVBenchError(f"--haystack {path} is zstd-compressed: pip install zstandard, or decompress it "
                                   "(zstd -d)") from None
            with open(path, "rb") as raw:
                text = zstandard.ZstdDecompressor().stream_reader(raw).read().decode("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        rows = json.loads(text) if stripped.startswith("[") else (
            json.loads(line) for line in text.splitlines() if line.strip())
        for row in rows:
            if isinstance(row, str):
                yield row
            elif isinstance(row, dict) and field in row:
                yield str(row[field])
            else:
                raise KVBenchError(f"--haystack {path}: a record has no '{field}' field; set --text-field")
        return
    yield from re.split(r"(?<=\n\n)", path.read_text(encoding="utf-8"))


def haystack_ids(tokenizer, texts: Iterator[str], tokens: int) -> list[int]:
    """The texts concatenated (as the reference: no separator) until they hold `tokens` tokens, tokenised whole
    and cut there (data.py:125-132)."""
    pieces, count = [], 0
    for text in texts:
        pieces.append(text)
        count += len(tokenizer.encode(text, add_special_tokens=False))
        if count >= tokens:
            break
    return tokenizer.encode("".join(pieces), add_special_tokens=False)[:tokens]


# ----------------------------------------------------------------------------- training


@contextmanager
def frozen(model):
    """Every model weight without gradient, restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def checkpointed(decoder, enabled: bool):
    """Activation checkpointing of each decoder layer (train.py:302) through transformers' own layer wrapper;
    only the layer's own `training` flag is set, so no dropout turns on. Restored afterwards."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)] if enabled else []
    saved = [(m, m.gradient_checkpointing, m.training, m.__dict__.get("_gradient_checkpointing_func")) for m in layers]
    for m in layers:
        m.gradient_checkpointing = True
        m._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        m.training = True
    try:
        yield
    finally:
        for m, flag, training, func in saved:
            m.gradient_checkpointing, m.training = flag, training
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


@dataclass
class TrainSettings:
    steps: int = 2000
    lr: float = 0.02
    reg_weight: float = 0.05
    initial_value: float = 1.0
    sink_size: int = 128
    recent_size: int = 256
    streaming: str = "blocksparse"
    block_size: int = 128
    query_block: int = 512
    checkpointing: bool = True


def text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter else config


@contextmanager
def training(model, attention: DuoTraining, checkpointing: bool = False):
    """`model` runs `attention` (registered through transformers' AttentionInterface) with frozen weights and,
    if asked, checkpointed decoder layers; all restored afterwards."""
    with attention_function(model, PROBE, attention), frozen(model), \
            checkpointed(model.get_decoder(), checkpointing):
        yield


def step_loss(model, attention: DuoTraining, ids: torch.Tensor, first: int, reg_weight: float):
    """(loss, distill, reg) of one sample (1, n) whose labelled tokens start at `first`: the teacher forward
    (no gradient), then the student's (train.py:104-156). Inside `training(model, attention)`."""
    decoder = model.get_decoder()
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    attention.teacher = True
    with torch.no_grad():
        teacher = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    attention.teacher = False  # and so it stays: a backward through checkpointed layers replays the student
    student = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return duo_loss(teacher[0, first:], student[0, first:], attention.gates, reg_weight)


def train_gates(model, data: PasskeyData, settings: TrainSettings, progress=None) -> tuple[torch.Tensor, dict]:
    """Train the gates (layers, kv_heads) on `data` as DuoAttention does; returns them (float32, unclipped) and
    a summary. The model is left as it was (weights, gradient flags, attention, modes)."""
    config = text_config(model.config)
    device = next(model.parameters()).device
    gates = torch.nn.Parameter(torch.full((config.num_hidden_layers, config.num_key_value_heads),
                                          float(settings.initial_value), device=device))
    block = settings.block_size if settings.streaming == "blocksparse" else None
    attention = DuoTraining(gates, settings.sink_size, settings.recent_size, block, settings.query_block)
    optimizer = torch.optim.AdamW([gates], lr=settings.lr, weight_decay=0)  # train.py:344
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, steps=settings.steps))
    step, last = 0, {}
    with training(model, attention, settings.checkpointing):
        while step < settings.steps:
            for length in data.epoch():
                with torch.no_grad():
                    gates.clamp_(0, 1)  # train.py:98-102
                ids, first = data.sample(length)
                ids = ids[None].to(device)
                loss, distill, reg = step_loss(model, attention, ids, first, settings.reg_weight)
                loss.backward()
                attention.full.clear()  # kept until the backward, which may replay the student's layers
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                last = {"distill_loss": distill.item(), "reg_loss": reg.item(), "sample_len": ids.shape[1],
                        "labelled": ids.shape[1] - first}
                if progress is not None:
                    progress.set_description(f"len={ids.shape[1]}/{ids.shape[1] - first}"
                                             f"|Dloss={last['distill_loss']:.3f}|Rloss={last['reg_loss']:.3f}"
                                             f"|LR={lr:.2e}")
                    progress.update(1)
                if step >= settings.steps:
                    break
    return gates.detach().float(), {"steps": step, **last}


# ----------------------------------------------------------------------------- output


def pattern_text(alpha: np.ndarray) -> str:
    buffer = io.StringIO()
    np.savetxt(buffer, np.clip(alpha, 0, 1), delimiter="\t")  # utils.py:376-381 ("%.18e"), clipped (docstring)
    return buffer.getvalue()


def existing_output(out: Path) -> bool:
    return (out / PATTERN_FILE).exists() or (out / "config.json").exists()


def write_patterns(out: Path, alpha: np.ndarray, config: dict, overwrite: bool = False) -> Path:
    """Write full_attention_heads.tsv and config.json into `out`, never half-written: a new folder is built
    beside it and renamed into place; an existing one (with --overwrite) gets both files complete under
    temporary names first, then renamed over the old ones."""
    files = {"config.json": json.dumps(config, indent=1) + "\n", PATTERN_FILE: pattern_text(alpha)}
    if existing_output(out) and not overwrite:
        raise KVBenchError(f"{out} already holds DuoAttention patterns: pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o755)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out
    staged = {}
    try:
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
            staged[name] = tmp
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        for name in ("config.json", PATTERN_FILE):  # the table last: it is what marks a pattern folder
            os.replace(staged[name], out / name)
            del staged[name]
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


# ----------------------------------------------------------------------------- command line


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", required=True, help="configs/model name, hub id or model folder")
    add("--haystack", default=str(HAYSTACK), help="text file, or .jsonl/.json/.parquet of texts (default: kvbench's)")
    add("--text-field", default="text", help="the text field of a .jsonl/.json/.parquet haystack")
    add("--out", default=None, help="output folder (default results/duo_patterns/<model name>)")
    add("--overwrite", action="store_true", help="replace the patterns already in --out")
    add("--steps", type=int, default=2000)
    add("--lr", type=float, default=0.02)
    add("--reg", type=float, default=0.05, help="reg_weight of the L1 term")
    add("--initial-value", type=float, default=1.0)
    add("--sink-size", type=int, default=128)
    add("--recent-size", type=int, default=256)
    add("--streaming-attn", choices=STREAMING, default="blocksparse",
        help="blocksparse: 128-token blocks (the reference default); sdpa: the token mask")
    add("--block-size", type=int, default=128, help="block of --streaming-attn blocksparse (the kernel's: 128)")
    add("--ctx-min", type=int, default=1000)
    add("--ctx-max", type=int, default=None, help="default: min(32000, the model's limit, what the haystack holds)")
    add("--ctx-intervals", type=int, default=50)
    add("--depth-intervals", type=int, default=1000)
    add("--min-depth", type=float, default=0.05)
    add("--max-depth", type=float, default=0.95)
    add("--num-passkeys", type=int, default=10)
    add("--passkey-length", type=int, default=32, help="words per passkey")
    add("--buffer", type=int, default=300, help="tokens left free below --ctx-max")
    add("--seed", type=int, default=42)
    add("--query-block", type=int, default=512, help="queries per block of the streaming attention")
    add("--no-checkpointing", action="store_true", help="keep every layer's activations (more memory, faster)")
    add("--device", default=None)
    add("--dtype", default=None)
    return parser.parse_args(argv)


def check_args(args) -> None:
    """One KVBenchError line for settings the training cannot run with."""
    checks = [
        (args.steps >= 1, f"--steps {args.steps} must be >= 1"),
        (args.lr > 0, f"--lr {args.lr} must be > 0"),
        (args.reg >= 0, f"--reg {args.reg} must be >= 0"),
        (0 <= args.initial_value <= 1, f"--initial-value {args.initial_value} must be in [0, 1]"),
        (args.sink_size >= 0, f"--sink-size {args.sink_size} must be >= 0"),
        (args.recent_size >= 1, f"--recent-size {args.recent_size} must be >= 1 (a token sees itself)"),
        (args.block_size >= 1, f"--block-size {args.block_size} must be >= 1"),
        (args.query_block >= 1, f"--query-block {args.query_block} must be >= 1"),
        (1 <= args.num_passkeys <= len(ORDINALS),
         f"--num-passkeys {args.num_passkeys} must be in 1..{len(ORDINALS)} (the needles say first..twentieth)"),
        (args.num_passkeys <= args.depth_intervals,
         f"--depth-intervals {args.depth_intervals} must be >= --num-passkeys {args.num_passkeys} (distinct depths)"),
        (args.passkey_length >= 1, f"--passkey-length {args.passkey_length} must be >= 1"),
        (args.ctx_intervals >= 1, f"--ctx-intervals {args.ctx_intervals} must be >= 1"),
        (0 <= args.min_depth <= args.max_depth <= 1,
         f"--min-depth {args.min_depth} and --max-depth {args.max_depth} must satisfy 0 <= min <= max <= 1"),
        (args.ctx_min >= 1, f"--ctx-min {args.ctx_min} must be >= 1"),
        (args.ctx_max is None or args.ctx_max >= args.ctx_min,
         f"--ctx-min {args.ctx_min} is above --ctx-max {args.ctx_max}: lower --ctx-min"),
        (args.buffer >= 0, f"--buffer {args.buffer} must be >= 0"),
        (Path(args.haystack).is_file(),
         f"--haystack {args.haystack} not found: pass a text file or a .jsonl/.json/.parquet of texts"),
    ]
    for ok, message in checks:
        if not ok:
            raise KVBenchError(message)


def prepare_data(tokenizer, args, cap: int | None) -> PasskeyData:
    """The passkey data with its haystack; ctx_max resolved against the model's limit and the haystack."""
    explicit = args.ctx_max is not None
    ctx_max = args.ctx_max if explicit else DEFAULT_CTX_MAX
    if cap:
        ctx_max = min(ctx_max, cap)
    settings = DataSettings(args.num_passkeys, args.passkey_length, args.ctx_min, ctx_max, args.ctx_intervals,
                            args.depth_intervals, args.min_depth, args.max_depth, args.buffer)
    generator = torch.Generator().manual_seed(args.seed)
    data = PasskeyData(tokenizer, settings, generator)
    ids = haystack_ids(tokenizer, read_texts(Path(args.haystack), args.text_field), ctx_max)
    if not ids:
        raise KVBenchError(f"--haystack {args.haystack} holds no text")
    fixed = args.buffer + data.other
    if not explicit and len(ids) < data.room:
        settings.ctx_max = len(ids) + fixed  # what the haystack holds
    if settings.ctx_max < args.ctx_min:
        raise KVBenchError(f"contexts reach at most {settings.ctx_max} tokens (model limit {cap}, haystack {len(ids)} "
                           f"tokens) but --ctx-min is {args.ctx_min}: lower --ctx-min or pass a longer --haystack")
    if data.room <= 0:
        raise KVBenchError(f"--ctx-max {settings.ctx_max} leaves no haystack after the passkeys, questions and "
                           f"--buffer ({fixed} tokens): raise --ctx-max or lower "
                           "--num-passkeys/--passkey-length/--buffer")
    if len(ids) < data.room:
        raise KVBenchError(f"--haystack {args.haystack} holds {len(ids)} tokens but --ctx-max {settings.ctx_max} needs "
                           f"{data.room}: pass a longer text (DuoAttention uses BookSum) or lower --ctx-max to "
                           f"{len(ids) + fixed}")
    data.lengths = torch.linspace(settings.ctx_min, settings.ctx_max, settings.ctx_intervals, dtype=torch.int)
    data.set_haystack(ids)
    return data


def run_config(args, cfg: dict, data: PasskeyData, model, summary: dict, seconds: float) -> dict:
    """config.json: the run's settings under the reference's argument names (train.py:355-363) + kvbench's."""
    s = data.settings
    return {
        "model_name": cfg.get("path") or cfg["name"], "dataset_name": str(args.haystack),
        "dataset_format": "multiple_passkey", "lr": args.lr, "num_steps": args.steps, "batch_size": 1,
        "max_length": s.ctx_max, "context_length_min": s.ctx_min, "context_length_max": s.ctx_max,
        "context_lengths_num_intervals": s.ctx_intervals, "depth_ratio_num_intervals": s.depth_intervals,
        "num_passkeys": s.num_passkeys, "sink_size": args.sink_size, "recent_size": args.recent_size,
        "reg_weight": args.reg, "initial_value": args.initial_value, "min_needle_depth_ratio": s.min_depth,
        "max_needle_depth_ratio": s.max_depth, "gradient_accumulation_steps": 1,
        "streaming_attn_implementation": args.streaming_attn, "supervision": "distill",
        "passkey_length": s.passkey_length, "seed": args.seed,
        "kvbench": {"script": "scripts/estimate_duo_patterns.py", "reference": REFERENCE, "model": cfg["name"],
                    "block_size": args.block_size if args.streaming_attn == "blocksparse" else None,
                    "buffer": s.buffer, "text_field": args.text_field,
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "device": str(next(model.parameters()).device), "seconds": round(seconds, 1),
                    "checkpointing": not args.no_checkpointing, "last_step": summary},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        check_args(args)
        cfg = model_config(args.model, args.device, args.dtype)
        out = Path(args.out or Path("results") / "duo_patterns" / cfg["name"])
        if existing_output(out) and not args.overwrite:
            raise KVBenchError(f"{out} already holds DuoAttention patterns: pass --overwrite or choose another --out")
        torch.manual_seed(args.seed)
        model, tokenizer = models.load(cfg)
        text = text_config(model.config)
        cap = cfg.get("max_prompt_tokens") or getattr(text, "max_position_embeddings", None)
        data = prepare_data(tokenizer, args, cap)
        settings = TrainSettings(args.steps, args.lr, args.reg, args.initial_value, args.sink_size, args.recent_size,
                                 args.streaming_attn, args.block_size, args.query_block, not args.no_checkpointing)
        print(f"{cfg['name']}: {text.num_hidden_layers} layers x {text.num_key_value_heads} KV heads, contexts "
              f"{data.settings.ctx_min}..{data.settings.ctx_max} tokens, {args.steps} steps", file=sys.stderr)
        started = time.time()
        with tqdm(total=args.steps, desc=cfg["name"], unit="step") as progress:
            gates, summary = train_gates(model, data, settings, progress)
        alpha = gates.cpu().double().numpy()
        config = run_config(args, cfg, data, model, summary, time.time() - started)
        write_patterns(out, alpha, config, args.overwrite)
    except KVBenchError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2
    clipped = np.clip(alpha, 0, 1)
    print(f"wrote {clipped.shape[0]} x {clipped.shape[1]} gates -> {out / PATTERN_FILE} (mean {clipped.mean():.3f}, "
          f"{int((clipped < 0.5).sum())} below 0.5; last distill loss {summary.get('distill_loss', 0):.4g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
