"""What tasks evaluate with: a `Generator` (model, tokenizer, method, budget, chat format) whose greedy
generation runs through the engine's `Session` (prefill once, compress, decode token by token).

kvbench drives the model itself (not `model.generate`) so that it owns the
position ids (`original` or `shifted`), the cache phase, and the accounting.
With `method=full` the tokens equal `model.generate(do_sample=False)` (a test).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from kvbench.engine import Budget, Policy, Sampling, Session
from kvbench.engine.batch import Request, batch_plan, decode_together
from kvbench.engine.types import RepeatPrompts
from kvbench.errors import KVBenchError
from kvbench.models.chat import repeat_prompts, wrap_chat


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per sequence, stop token excluded
    prompt_tokens: int
    seconds: float  # prefill + decode
    kv: dict = field(default_factory=dict)
    prefill_seconds: float = 0.0  # the prompt's forward pass and its compression (up to the first token's logits)

    def record_fields(self) -> dict:
        """What every prediction record stores about its generation (sequence 0): sizes, time, KV kept.

        The kv_* counts are the cache right after the prompt (prefill and its compression);
        kv_decoded_tokens and kv_end_kept_tokens say what decoding added."""
        return {
            "n_prompt": self.prompt_tokens,
            "n_new": len(self.tokens[0]),
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            **self.kv,
        }


@dataclass
class Prompt:
    """What a task asks to generate for one sample: the prompt ids (1, n), at most `max_new_tokens`, its
    stop tokens (EOS included) and `min_new_tokens`; `info` is what the task keeps for the sample's record;
    `question_start`: the index of the question's first token (None: the task marks no question)."""

    input_ids: torch.Tensor
    max_new_tokens: int
    stop_token_ids: list[int]
    min_new_tokens: int = 0
    info: dict = field(default_factory=dict)
    question_start: int | None = None
    sampling: Sampling | None = None  # None: greedy

    def parts(self, query: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids the method compresses, ids appended after it): the whole prompt and None when query-aware;
        the context and the question when query-agnostic (`method.query=agnostic`)."""
        if query != "agnostic":
            return self.input_ids, None
        if self.question_start is None:
            raise KVBenchError("method.query=agnostic compresses the context before the question, but this task "
                               "marks no question in this prompt (perplexity; a prompt with no context; a question "
                               "cut by truncation): use method.query=aware")
        return self.input_ids[:, : self.question_start], self.input_ids[:, self.question_start :]


def decode_kv(prompt: dict, end: dict) -> dict:
    """What decoding added: tokens decoded into the cache (per sequence), every head's cache at the end, and
    the most it held at once (the uncompressed prompt of a prefill-stage method, budget + 1 of a decode-stage one)."""
    return {
        "kv_decoded_tokens": end["kv_seen_tokens"] - prompt["kv_seen_tokens"],
        "kv_end_kept_tokens": end["kv_kept_tokens"],
        "kv_peak_tokens": end["kv_peak_tokens"],
    }


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    method: Policy,
    budget: Budget | None = None,
    max_new_tokens: int = 32,
    stop_token_ids: tuple[int, ...] | list[int] = (),
    min_new_tokens: int = 0,
    question_ids: torch.Tensor | None = None,
    sampling: Sampling | None = None,
    repeat: RepeatPrompts | None = None,
) -> Generation:
    """Greedy decoding of a batch of equal-length prompts `input_ids` (batch, n) through a `Session`; with
    `question_ids`, `input_ids` is the context, compressed before the question is appended (query-agnostic);
    `repeat`: what a method that reconstructs the prompt (KVzip) asks the model (`Generator.repeat_prompts`)."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    question = 0 if question_ids is None else question_ids.shape[1]
    session = Session(model, method, budget, reserve=max_new_tokens + question, repeat=repeat)
    greedy = session.generate(input_ids, max_new_tokens, stop_token_ids, min_new_tokens,
                              None if question_ids is None else question_ids.to(device), sampling)
    kv = {**greedy.prompt_kv, **decode_kv(greedy.prompt_kv, session.kv_summary())}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Generation(tokens=greedy.tokens, prompt_tokens=input_ids.shape[1] + question, seconds=time.perf_counter() - start,
                      kv=kv, prefill_seconds=greedy.prefill_end - start)


def question_start(full: str, question: str, ids: torch.Tensor, encode) -> int | None:
    """The index in `ids` (the encoded `full`) of the first token of the question's last occurrence in `full`:
    the tokens `full`'s text before it encodes to, up to where they first differ from `ids` (a token that
    spans the boundary goes to the question). A chat template may trim the message: `question` is stripped.
    None when the question is not in `full`."""
    at = full.rfind(question)
    if at < 0:
        return None
    before = encode(full[:at])[0]
    n = min(len(before), len(ids))
    same = (before[:n] == ids[:n]).long()
    start = int(same.cumprod(0).sum())
    return max(1, min(start, len(ids) - 1))


def starts_with_bos(text: str, tokenizer) -> bool:
    """Whether `text` already holds the tokenizer's BOS token at its start (a templated chat prompt)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


@dataclass
class Generator:
    """What a task evaluates with: the model and tokenizer, the method and budget, the chat format."""

    model: object
    tokenizer: object
    method: Policy
    budget: Budget | None = None
    chat_format: str = "none"
    chat_template_kwargs: dict | None = None  # passed to the tokenizer's chat template (Qwen3: enable_thinking)
    max_prompt_tokens: int | None = None  # tasks that truncate prompts (LongBench) truncate to this

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (1, n) with exactly one BOS where the tokenizer adds one.

        The tokenizer's special tokens are added unless the text already starts with the BOS token, as a
        chat template such as Llama-3's does (`<|begin_of_text|>`): KVCache-Factory's run_longbench.py
        tokenizes its Llama-3 chat prompts with add_special_tokens=False for that reason."""
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=not starts_with_bos(text, self.tokenizer)).input_ids

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def stops(self, stop_token_ids=None) -> list[int]:
        """The task's stop tokens and the tokenizer's EOS."""
        stops = list(stop_token_ids or [])
        if self.tokenizer.eos_token_id is not None:
            stops.append(self.tokenizer.eos_token_id)
        return stops

    def __call__(self, input_ids, max_new_tokens: int, stop_token_ids=None, min_new_tokens: int = 0) -> Generation:
        return generate(self.model, input_ids, self.method, self.budget, max_new_tokens, self.stops(stop_token_ids),
                        min_new_tokens)

    def prompt(self, text: str, max_new_tokens: int, chat: bool = True, stop_token_ids=None, min_new_tokens: int = 0,
               question: str | None = None, answer_prefix: str = "", **info) -> Prompt:
        """A task's generation request: `text` wrapped in the chat format (when `chat`), then `answer_prefix`
        (the start of the answer, after the wrapping), encoded, with the stop tokens (EOS included); `info` is
        what the task keeps for its record. `question`: the end of `text` that is the question (after the
        context); the prompt then records where its tokens start, for `method.query=agnostic` (not when a
        truncation cut into it)."""
        full = (wrap_chat(text, self.chat_format, self.tokenizer, self.chat_template_kwargs) if chat else text)
        full += answer_prefix
        input_ids = self.encode(full)
        start = None
        if question is not None and question.strip():
            start = question_start(full, question.strip(), input_ids[0], self.encode)
        return Prompt(input_ids, max_new_tokens, self.stops(stop_token_ids), min_new_tokens, info, start)

    @property
    def query(self) -> str:
        return getattr(self.method, "query", "aware")

    def repeat_prompts(self, context: torch.Tensor) -> RepeatPrompts | None:
        """What a method that reconstructs the prompt (KVzip) asks the model, for `context` (1, n) in this chat
        format (`kvbench.models.chat.repeat_prompts`); None for other methods."""
        return repeat_prompts(self.tokenizer, self.method, context, self.chat_format, self.chat_template_kwargs,
                              self.encode)

    def run(self, prompt: Prompt) -> Generation:
        """One prompt, alone (batch 1)."""
        context, question = prompt.parts(self.query)
        return generate(self.model, context, self.method, self.budget, prompt.max_new_tokens,
                        prompt.stop_token_ids, prompt.min_new_tokens, question, prompt.sampling,
                        self.repeat_prompts(context))

    def run_many(self, prompts: Iterable[Prompt], batch_size: int | str = 1) -> Iterator[tuple[int, Prompt, Generation]]:
        """Every prompt, decoded `batch_size` at a time (`kvbench.engine.batch`; "auto": as many as the free
        memory admits, at most kvbench.engine.batch.AUTO_BATCH), yielded as (its index, it, its Generation) as each finishes.
        The tokens equal `run(prompt)`'s in float32."""
        seen: dict[int, Prompt] = {}

        def requests():
            for i, prompt in enumerate(prompts):
                seen[i] = prompt
                context, question = prompt.parts(self.query)
                yield Request(context, prompt.max_new_tokens, prompt.stop_token_ids, prompt.min_new_tokens, question,
                              prompt.sampling, self.repeat_prompts(context))

        device = next(self.model.parameters()).device
        size, admit = batch_plan(self.model, batch_size, device)
        for i, decoded in decode_together(self.model, requests(), self.method, self.budget, size, admit):
            prompt = seen.pop(i)
            kv = {**decoded.prompt_kv, **decode_kv(decoded.prompt_kv, decoded.session.kv_summary())}
            yield i, prompt, Generation(tokens=[decoded.tokens], prompt_tokens=prompt.input_ids.shape[1],
                                        seconds=decoded.end - decoded.start, kv=kv,
                                        prefill_seconds=decoded.prefill_end - decoded.start)

    def complete(self, prompt: str, max_new_tokens: int, chat: bool = True, **kwargs) -> tuple[str, Generation]:
        """Wrap `prompt` in the chat format (when `chat`), generate greedily, return the decoded text."""
        generation = self.run(self.prompt(prompt, max_new_tokens, chat=chat, **kwargs))
        return self.decode(generation.tokens[0]), generation
