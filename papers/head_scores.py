"""HeadKV head-importance estimation: writes the score files `kvbench.methods.head_scores` reads.

`scripts/estimate_head_scores.py` is its command line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvbench.engine import cache_argument
from kvbench.engine.attention import attention_function, kvbench_attention
from kvbench.errors import KVBenchError
from kvbench.resources import ASSETS_DIR

# ----------------------------------------------------------------------------- estimation
#
# HeadKV's retrieval and retrieval-reasoning head detection (FYYFU/HeadKV, Important_Head/
# retrieval_head_detection.py and retrieval_head_detection_r2.py), rule for rule:
#
# - prompt: [BOS] + haystack with the needle inserted + "Based on the content of the book, Question: {q}\nAnswer:",
#   no chat template. The haystack and needle take `length - 200` tokens (the official 200-token buffer); the
#   needle goes in at int(depth% x haystack tokens), moved back to just after a period ('.' token); depth 100
#   puts it at the end. Lengths round(linspace(0, 10000, 5)), depths round(linspace(0, 100, 10)) percent.
# - greedy decoding, at most 50 new tokens; at every generated token, the attention row (per query head) of
#   the query that produced it:
#   R  credits a head 1 / |span| when its top-1 position lies in the needle's answer span and holds the
#      token just generated; it stops at a newline token.
#   R2 takes the head's top-|span| positions and credits each one inside the span with its weight / |span|;
#      it stops at a newline, at EOS, or once it has as many tokens as the answer.
# - a run counts (its per-head sums appended to the heads' lists) when it succeeded by the official test:
#   R: ROUGE-1 recall (rouge_score, stemmer on) of the span by the answer x 100 > 50;
#   R2: LongBench's QA-F1 of the answer x 100 > 50.
#
# Remaining differences (scripts/estimate_head_scores.py lists them too): our own needles and haystack
# (kvbench/assets/haystack.txt, long enough never to repeat inside one prompt; the official repeats its essay
# files); spans found exactly by building the prompt from token pieces (the official re-tokenises the decoded
# text and searches the span by token overlap); the newline is the tokenizer's own newline token (the official
# tests SentencePiece's '<0x0A>' or id 144, which Llama-3's newline is not, so its R runs there go on to 50
# tokens); attention rows in float32 (the official's in the model dtype, bf16); lengths above the model's
# max_prompt_tokens are capped to it; results are written fresh (the official appends to an existing file).

HAYSTACK = ASSETS_DIR / "haystack.txt"
PROBE = "kvbench_headprobe"
BUFFER = 200  # tokens the official leaves for the question and the answer
QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Needle:
    text: str  # inserted into the haystack; contains `span`
    question: str
    span: str  # the needle's answer span: the tokens a head is credited for (the official `real_needle`)
    answer: str = ""  # R2: the reference for QA-F1 and the answer length that stops generation (default: span)

    @property
    def reference(self) -> str:
        return self.answer or self.span


NEEDLES = {
    "r": [  # the answer is copied out of the needle
        Needle("The best way to keep bread fresh in a humid harbour town is to wrap it in linen and store it in "
               "a cedar box.", "What is the best way to keep bread fresh in a humid harbour town?",
               "wrap it in linen and store it in a cedar box"),
        Needle("Every spring the keeper of the Gull Island lighthouse paints the spiral stairs a bright orange.",
               "What does the keeper of the Gull Island lighthouse do every spring?",
               "paints the spiral stairs a bright orange"),
        Needle("The secret ingredient in Aunt Rosa's famous soup is a spoonful of smoked paprika and a squeeze of "
               "lemon.", "What is the secret ingredient in Aunt Rosa's famous soup?",
               "a spoonful of smoked paprika and a squeeze of lemon"),
    ],
    "r2": [  # two people, two facts each: the question needs a comparison before the answer can be copied
        Needle("Lena's hobby is building model ships from driftwood and old sailcloth. Tomas's hobby is growing "
               "giant pumpkins behind the garage. Lena is 41 years old. Tomas is 38 years old.",
               "What is the hobby of the older one between Lena and Tomas?",
               "Lena's hobby is building model ships from driftwood and old sailcloth."),
        Needle("Tomas's hobby is growing giant pumpkins behind the garage. Lena's hobby is building model ships "
               "from driftwood and old sailcloth. Lena is 41 years old. Tomas is 38 years old.",
               "What is the hobby of the younger one between Lena and Tomas?",
               "Tomas's hobby is growing giant pumpkins behind the garage."),
    ],
}


def official_lengths(lo: int, hi: int, count: int, cap: int | None) -> list[int]:
    """np.round(np.linspace(lo, hi, count)) as the official scripts, each capped at `cap`, without repeats."""
    lengths = [int(x) for x in np.round(np.linspace(lo, hi, num=count, endpoint=True)).astype(int)]
    if cap is not None:
        lengths = [min(x, cap) for x in lengths]
    return list(dict.fromkeys(lengths))


def official_depths(count: int) -> list[int]:
    """Depth percents np.round(np.linspace(0, 100, count)) as the official scripts."""
    return [int(x) for x in np.round(np.linspace(0, 100, num=count, endpoint=True)).astype(int)]


def step_scores(rows: torch.Tensor, token: int, context: torch.Tensor, span: tuple[int, int],
                variant: str) -> torch.Tensor:
    """One generated token's contribution (layers, heads) from attention rows (layers, heads, kv).

    `context` holds the token ids at every attended position; the span is [start, stop)."""
    length = span[1] - span[0]
    if variant == "r":
        top = rows.argmax(dim=-1)
        hit = (top >= span[0]) & (top < span[1]) & (context[top] == token)
        return hit.double() / length
    weights, positions = rows.topk(min(length, rows.shape[-1]), dim=-1)
    inside = (positions >= span[0]) & (positions < span[1])
    return (weights.double() * inside).sum(dim=-1) / length


def succeeded(variant: str, response: str, needle: Needle) -> bool:
    """The official success test: R ROUGE-1 recall of the span > 50; R2 QA-F1 of the answer > 50 (x 100)."""
    if variant == "r":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
        return scorer.score(needle.span, response)["rouge1"].recall * 100 > 50
    from kvbench.tasks.metrics import qa_f1

    return qa_f1(response, needle.reference) * 100 > 50


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


def build_prompt(tokenizer, haystack_ids: list[int], needle: Needle, length: int,
                 depth_percent: float) -> tuple[list[int], tuple[int, int]]:
    """(ids, span): haystack + needle in `length - 200` tokens, the needle at `depth_percent`, then the question."""
    ids: list[int] = []
    if tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]:
        ids.append(tokenizer.bos_token_id)
    answer_at = needle.text.index(needle.span)
    before, span_text = " " + needle.text[:answer_at], needle.span
    if before.endswith(" "):  # the space before the span goes with it, as in running text
        before, span_text = before[:-1], " " + span_text
    pieces = [before, span_text, needle.text[answer_at + len(needle.span):]]
    needle_ids = [tokenizer(p, add_special_tokens=False).input_ids if p else [] for p in pieces]
    room = max(0, length - BUFFER - sum(len(p) for p in needle_ids))
    if room > len(haystack_ids):
        raise KVBenchError(
            f"the haystack ({HAYSTACK.name}, {len(haystack_ids)} tokens) is too short for a {length}-token prompt "
            "without repeating itself; lower max_length or extend it with scripts/make_haystack.py"
        )
    context = haystack_ids[:room]
    cut = len(context) if depth_percent >= 100 else int(len(context) * depth_percent / 100)
    period = tokenizer(".", add_special_tokens=False).input_ids[-1:]
    while cut > 0 and context[cut - 1 : cut] != period:  # insert after a sentence, as the official
        cut -= 1
    ids += context[:cut] + needle_ids[0]
    span = (len(ids), len(ids) + len(needle_ids[1]))
    ids += needle_ids[1] + needle_ids[2] + context[cut:]
    ids += tokenizer(QUESTION.format(question=needle.question), add_special_tokens=False).input_ids
    return ids, span


@torch.inference_mode()
def needle_run(model, tokenizer, ids: list[int], span, variant: str, max_new_tokens: int,
               answer_tokens: int) -> tuple[str, torch.Tensor]:
    """Greedy answer and the run's per-head score (layers, query heads) for one prompt, stopping as the
    official scripts (R: newline; R2: newline, EOS or `answer_tokens` tokens).

    The model must run `probe_attention` (see `estimate_head_scores`)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    config = model.config
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    score = torch.zeros(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64)
    context = torch.tensor(ids, device=device)
    cache = DynamicCache(config=config)
    new: list[int] = []
    step_ids = context[None]
    for _ in range(max_new_tokens):
        probe: dict[int, torch.Tensor] = {}
        start = context.shape[0] - step_ids.shape[1]
        out = model(input_ids=step_ids, position_ids=torch.arange(start, context.shape[0], device=device)[None],
                    **cache_argument(model, cache), use_cache=True, kvbench_probe=probe, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        rows = torch.stack([probe[i] for i in range(config.num_hidden_layers)])
        score += step_scores(rows, token, context, span, variant).cpu()
        new.append(token)
        if token == newline or (variant == "r2" and (token == tokenizer.eos_token_id or len(new) >= answer_tokens)):
            break
        context = torch.cat([context, context.new_tensor([token])])
        step_ids = context[-1:][None]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), score


def estimate_head_scores(model, tokenizer, variant: str, lengths: list[int], depths: list[float],
                         max_new_tokens: int = 50, only_successful: bool = True,
                         needles: list[Needle] | None = None, progress=None) -> tuple[dict, dict]:
    """Per-head lists of run scores ({(layer, head): [..]}) and a summary of the runs; depths in percent."""
    if variant not in NEEDLES:
        raise KVBenchError(f"variant={variant} is not one of: {', '.join(NEEDLES)}")
    config = model.config
    haystack_ids = tokenizer(HAYSTACK.read_text(), add_special_tokens=False).input_ids
    scores = {(layer, head): [] for layer in range(config.num_hidden_layers) for head in range(config.num_attention_heads)}
    runs = successes = 0
    prompts = [(needle, length, depth) for needle in needles or NEEDLES[variant] for length in lengths for depth in depths]
    with attention_function(model, PROBE, probe_attention):
        for needle, length, depth in prompts:
            ids, span = build_prompt(tokenizer, haystack_ids, needle, length, depth)
            answer_tokens = len(tokenizer(needle.reference, add_special_tokens=False).input_ids)
            text, score = needle_run(model, tokenizer, ids, span, variant, max_new_tokens, answer_tokens)
            success = succeeded(variant, text, needle)
            runs += 1
            successes += success
            if success or not only_successful:
                for (layer, head), values in scores.items():
                    values.append(round(float(score[layer, head]), 6))
            if progress is not None:
                progress.update(1)
    return scores, {"variant": variant, "runs": runs, "successful": successes, "counted": len(scores[0, 0])}
