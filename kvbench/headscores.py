"""Head-importance score files (HeadKV's published format) and their estimation.

Format: one JSON object; keys "layer-head" for every query head ("0-0", "0-1", ...),
values lists of per-run scores. A head's importance is the mean of its list (0 when
empty). The files HeadKV publishes for Llama-3-8B-Instruct and Mistral-7B-Instruct
load as they are; `scripts/estimate_head_scores.py` writes the same format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvbench import KVBenchError
from kvbench.attention import attention_function, kvbench_attention
from kvbench.results import atomic_write_text

KEY = re.compile(r"^(\d+)-(\d+)$")


def load_head_scores(path: str | Path) -> torch.Tensor:
    """Importance (layers, query_heads) float64: the mean of each head's score list."""
    path = Path(path)
    if not path.is_file():
        raise KVBenchError(
            f"head-score file {path} not found; set method.head_scores=PATH "
            "(make one with scripts/estimate_head_scores.py)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KVBenchError(f"head-score file {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise KVBenchError(f"head-score file {path} must be one JSON object of \"layer-head\": [scores]")
    means = {}
    for key, scores in data.items():
        match = KEY.match(str(key))
        if match is None or not isinstance(scores, list):
            raise KVBenchError(f"head-score file {path}: entry {key!r} is not \"layer-head\": [scores]")
        # np.mean as HeadKV's code takes it (its summation order); an empty list scores 0 (NaN there)
        means[int(match[1]), int(match[2])] = float(np.mean(scores)) if scores else 0.0
    layers = 1 + max(layer for layer, _ in means)
    heads = 1 + max(head for _, head in means)
    missing = [f"{layer}-{head}" for layer in range(layers) for head in range(heads) if (layer, head) not in means]
    if missing:
        raise KVBenchError(f"head-score file {path} lacks heads {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    importance = torch.zeros(layers, heads, dtype=torch.float64)
    for (layer, head), value in means.items():
        importance[layer, head] = value
    return importance


def write_head_scores(path: str | Path, scores: dict[tuple[int, int], list[float]]) -> None:
    """Write {(layer, head): [per-run scores]} in the published format, atomically."""
    data = {f"{layer}-{head}": [float(s) for s in values] for (layer, head), values in sorted(scores.items())}
    atomic_write_text(Path(path), json.dumps(data))


# ----------------------------------------------------------------------------- estimation
#
# A needle-in-a-haystack run: our own haystack text (kvbench/assets/haystack.txt) with a
# needle inserted at a depth, then a question; greedy decoding; at every generated token
# the attention row of the query that produced it, for every (layer, query head):
#
#   R  (retrieval, after Wu et al.'s retrieval heads): if the head's top-1 attended position
#      lies in the needle and holds the token just generated, the head gets 1 / len(needle).
#   R2 (retrieval-reasoning, HeadKV): the needle states two facts and the question needs a
#      step of reasoning; for each of the head's top-k attended positions (k = len(needle))
#      that lies in the correct answer's span, the head gets its attention weight / len(span).
#
# A run's per-head sum is appended to the head's list when the answer was right (all runs
# with `only_successful=False`), giving the published file format.

HAYSTACK = Path(__file__).resolve().parent / "assets" / "haystack.txt"
PROBE = "kvbench_headprobe"


@dataclass(frozen=True)
class Needle:
    text: str  # inserted into the haystack; contains `answer` (the span R2 credits)
    question: str
    answer: str


NEEDLES = {
    "r": [  # the answer is copied out of the needle
        Needle("The best way to keep bread fresh in a humid harbour town is to wrap it in linen and store it in "
               "a cedar box.", "What is the best way to keep bread fresh in a humid harbour town?",
               "wrap it in linen and store it in a cedar box"),
        Needle("Every spring the keeper of the Gull Island lighthouse paints the spiral stairs a bright orange.",
               "What does the keeper of the Gull Island lighthouse do every spring?",
               "paints the spiral stairs a bright orange"),
    ],
    "r2": [  # two facts; the answer needs both
        Needle("Mira was born in the same city as the painter Oskar Venn. Oskar Venn was born in Lisbon.",
               "In which city was Mira born?", "Lisbon"),
        Needle("The blue kettle belongs to the oldest of the three Harlow sisters. Of the three Harlow sisters, "
               "Clara is the oldest.", "Who owns the blue kettle?", "Clara"),
    ],
}


def step_scores(rows: torch.Tensor, token: int, context: torch.Tensor, needle: tuple[int, int],
                answer: tuple[int, int], variant: str) -> torch.Tensor:
    """One generated token's contribution (layers, heads) from attention rows (layers, heads, kv).

    `context` holds the token ids at every attended position; spans are [start, stop)."""
    needle_len, answer_len = needle[1] - needle[0], answer[1] - answer[0]
    if variant == "r":
        top = rows.argmax(dim=-1)
        hit = (top >= needle[0]) & (top < needle[1]) & (context[top] == token)
        return hit.double() / needle_len
    weights, positions = rows.topk(min(needle_len, rows.shape[-1]), dim=-1)
    inside = (positions >= answer[0]) & (positions < answer[1])
    return (weights.double() * inside).sum(dim=-1) / answer_len


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kvbench_probe=None,
                    **kwargs):
    """kvbench's attention, plus the last query's attention row per query head into `kvbench_probe`."""

    out, _ = kvbench_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kvbench_probe is not None:
        groups = query.shape[1] // key.shape[1]
        keys = key[0].repeat_interleave(groups, dim=0)  # (heads, kv, d)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        logits = torch.einsum("hd,hkd->hk", query[0, :, -1].float(), keys.float()) * scale
        kvbench_probe[module.layer_idx] = torch.softmax(logits, dim=-1)
    return out, None


class _Pieces:
    """Token ids built piece by piece, so the needle's and the answer's spans are exact."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, text: str, tag: str | None = None):
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if tag:
            self.spans[tag] = (len(self.ids), len(self.ids) + len(ids))
        self.ids += ids


def build_prompt(tokenizer, haystack_ids: list[int], needle: Needle, length: int, depth: float,
                 chat_format: str = "none") -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    """(ids, needle span, answer span): about `length` tokens of haystack with the needle at `depth`."""
    from kvbench.models import wrap_chat

    marker = "\x00PROMPT\x00"
    before, after = wrap_chat(marker, chat_format, tokenizer).split(marker)
    head = _Pieces(tokenizer)
    if tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]:
        head.ids.append(tokenizer.bos_token_id)
    head.add(before)
    tail_text = f"\n\nAnswer from the text above. {needle.question} Answer:"
    needle_ids = len(tokenizer(needle.text, add_special_tokens=False).input_ids)
    room = length - len(head.ids) - needle_ids - len(tokenizer(tail_text + after, add_special_tokens=False).input_ids)
    if room < 1:
        raise KVBenchError(
            f"a context of {length} tokens leaves no room for the haystack (needle, question and chat format take "
            f"{length - room}); use min_length above {length - room}"
        )
    context = (haystack_ids * (room // max(1, len(haystack_ids)) + 1))[:room]
    cut = round(depth * room)
    period = tokenizer(".", add_special_tokens=False).input_ids[-1:]
    while cut > 0 and context[cut - 1 : cut] != period:  # insert after a sentence
        cut -= 1
    head.ids += context[:cut]
    head.add(" ")
    start = len(head.ids)
    answer_at = needle.text.rindex(needle.answer)
    head.add(needle.text[:answer_at])
    head.add(needle.answer, "answer")
    head.add(needle.text[answer_at + len(needle.answer):])
    needle_span = (start, len(head.ids))
    head.add(" ")
    head.ids += context[cut:]
    head.add(tail_text + after)
    return head.ids, needle_span, head.spans["answer"]


@torch.inference_mode()
def needle_run(model, tokenizer, ids: list[int], needle_span, answer_span, variant: str,
               max_new_tokens: int) -> tuple[str, torch.Tensor]:
    """Greedy answer and the run's per-head score (layers, query heads) for one prompt.

    The model must run `probe_attention` (see `estimate_head_scores`)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    config = model.config
    score = torch.zeros(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64)
    context = torch.tensor(ids, device=device)
    cache = DynamicCache(config=config)
    new: list[int] = []
    step_ids = context[None]
    for _ in range(max_new_tokens):
        probe: dict[int, torch.Tensor] = {}
        start = context.shape[0] - step_ids.shape[1]
        out = model(input_ids=step_ids, position_ids=torch.arange(start, context.shape[0], device=device)[None],
                    past_key_values=cache, use_cache=True, kvbench_probe=probe, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        rows = torch.stack([probe[i] for i in range(config.num_hidden_layers)])
        score += step_scores(rows, token, context, needle_span, answer_span, variant).cpu()
        new.append(token)
        context = torch.cat([context, context.new_tensor([token])])
        step_ids = context[-1:][None]
    return tokenizer.decode(new, skip_special_tokens=True), score


def estimate_head_scores(model, tokenizer, variant: str, lengths: list[int], depths: list[float],
                         max_new_tokens: int = 50, chat_format: str = "none", only_successful: bool = True,
                         needles: list[Needle] | None = None, progress=None) -> tuple[dict, dict]:
    """Per-head lists of run scores ({(layer, head): [..]}) and a summary of the runs."""
    if variant not in NEEDLES:
        raise KVBenchError(f"variant={variant} is not one of: {', '.join(NEEDLES)}")
    config = model.config
    haystack_ids = tokenizer(HAYSTACK.read_text(), add_special_tokens=False).input_ids
    scores = {(layer, head): [] for layer in range(config.num_hidden_layers) for head in range(config.num_attention_heads)}
    runs = successes = 0
    prompts = [(needle, length, depth) for needle in needles or NEEDLES[variant] for length in lengths for depth in depths]
    with attention_function(model, PROBE, probe_attention):
        for needle, length, depth in prompts:
            ids, needle_span, answer_span = build_prompt(tokenizer, haystack_ids, needle, length, depth, chat_format)
            text, score = needle_run(model, tokenizer, ids, needle_span, answer_span, variant, max_new_tokens)
            success = needle.answer.lower() in text.lower()
            runs += 1
            successes += success
            if success or not only_successful:
                for (layer, head), values in scores.items():
                    values.append(round(float(score[layer, head]), 6))
            if progress is not None:
                progress.update(1)
    return scores, {"variant": variant, "runs": runs, "successful": successes, "counted": len(scores[0, 0])}
