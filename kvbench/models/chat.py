"""Chat formats: how a task's prompt is wrapped for a chat model (LongBench's `build_chat`)."""

from __future__ import annotations

import torch

from kvbench.engine.types import RepeatPrompts
from kvbench.errors import KVBenchError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_FORMATS = ("none", "llama2", "vicuna", "tokenizer")


def wrap_chat(prompt: str, chat_format: str, tokenizer=None, template_kwargs: dict | None = None) -> str:
    """Wrap a prompt in a model's chat format, as LongBench's `build_chat` does.

    llama2: `[INST]{prompt}[/INST]` exactly; vicuna: the v1.1 system line, then
    ` USER: {prompt} ASSISTANT:`; tokenizer: the tokenizer's own chat template, rendered with
    `template_kwargs` (`model.chat_template_kwargs`, e.g. Qwen3's `enable_thinking: false`).
    """
    if chat_format == "none":
        return prompt
    if chat_format == "llama2":
        return f"[INST]{prompt}[/INST]"
    if chat_format == "vicuna":
        return f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:"
    if chat_format == "tokenizer":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise KVBenchError("model.chat_format=tokenizer but the tokenizer has no chat template; use none")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
            **(template_kwargs or {}),
        )
    raise KVBenchError(f"model.chat_format={chat_format} is not one of: {', '.join(CHAT_FORMATS)}")


def chat_frame(chat_format: str, tokenizer=None, template_kwargs: dict | None = None) -> tuple[str, str]:
    """(opening, suffix): the text `wrap_chat` puts before a user's message and between it and the answer.
    As kvpress's KVzipPress finds them: a dummy message followed by a separator line, wrapped and split; a
    prompt with no chat format ends its message with "\n"."""
    if chat_format == "none":
        return "", "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    wrapped = wrap_chat(dummy + separator, chat_format, tokenizer, template_kwargs)
    opening_and_message, suffix = wrapped.split(separator)
    return opening_and_message.split(dummy)[0], suffix


def repeat_prompts(tokenizer, method, context: torch.Tensor, chat_format: str = "none",
                   template_kwargs: dict | None = None, encode=None) -> RepeatPrompts | None:
    """For a method that reconstructs the prompt (KVzip; None for any other): its two prompts and the chat
    format's suffix as token ids (no special tokens), and how many of `context`'s (1, n) first tokens are the
    chat format's opening, as `encode` (text -> ids (1, n); default: the tokenizer's) tokenizes it. With no
    opening nothing is left out: a BOS is repeated with the first chunk, as kvpress's prefix_length 0."""
    if not method.reconstructs:
        return None
    opening, suffix = chat_frame(chat_format, tokenizer, template_kwargs)
    plain = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]  # noqa: E731
    encode = encode or (lambda text: tokenizer(text, return_tensors="pt").input_ids)
    opening_ids = encode(opening)[0] if opening else torch.zeros(0, dtype=torch.long)
    n = min(len(opening_ids), context.shape[1])
    same = (opening_ids[:n] == context[0, :n].cpu()).long()
    return RepeatPrompts(int(same.cumprod(0).sum()), plain(method.first_prompt), plain(method.later_prompt),
                         plain(suffix))
