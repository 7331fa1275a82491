"""Models: loading (hub id, local folder, the shipped tiny model, PyPI-shipped SmolLM2), chat formats, and the
`Generator` tasks evaluate with (greedy decoding through the engine's `Session`)."""

from kvbench.models.chat import CHAT_FORMATS, wrap_chat
from kvbench.models.loading import load, resolve_config, resolve_device, resolve_dtype

__all__ = ["CHAT_FORMATS", "load", "resolve_config", "resolve_device", "resolve_dtype", "wrap_chat"]
