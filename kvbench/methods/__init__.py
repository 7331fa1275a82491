"""Compression methods: one small dataclass per file, and a registry name -> class."""

from __future__ import annotations

import dataclasses

from kvbench import KVBenchError
from kvbench.methods.base import Method
from kvbench.methods.full import Full
from kvbench.methods.streamingllm import StreamingLLM

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Full, StreamingLLM)}


def build(cfg) -> Method:
    """Build a method from a `configs/method/*.yaml` mapping: `name` plus the dataclass fields."""
    params = dict(cfg)
    name = params.pop("name", None)
    if name not in REGISTRY:
        raise KVBenchError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise KVBenchError(
            f"method '{name}' has no setting {', '.join(unknown)}; its settings are: {', '.join(sorted(fields))}"
        )
    return cls(**params)


__all__ = ["Method", "REGISTRY", "build"]
