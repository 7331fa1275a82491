"""Chat formats: how a task's prompt is wrapped for a chat model (LongBench's `build_chat`)."""

from __future__ import annotations

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
