"""Which attention each layer of a model runs, read from its config, and the models kvbench refuses.

kvbench serves decoders whose layers are full causal attention or sliding-window attention (Mistral: one
window on every layer; Gemma 2/3, gpt-oss, Qwen with `use_sliding_window`: `config.layer_types`). It
refuses, with one line before any sample, what its cache cannot hold: multi-head latent attention
(DeepSeek-V2/V3, whose cache is a compressed latent, not per-head keys and values), state-space and
linear-attention layers (Mamba, Jamba, Qwen3-Next, ...), chunked attention (Llama 4), shared-KV layers,
and encoder-decoders.
"""

from __future__ import annotations

from kvbench.errors import KVBenchError

FULL, SLIDING = "full_attention", "sliding_attention"
# config fields that mark a layer kind kvbench's cache cannot hold, with what to call it
UNSUPPORTED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention (a compressed latent cache, not per-head keys and values)",
    "layers_block_type": "state-space / attention hybrid layers",
    "hybrid_override_pattern": "state-space / attention hybrid layers",
    "attn_layer_indices": "state-space / attention hybrid layers",
    "kv_sharing_modes": "layers that share another layer's KV cache",
}
NO_ATTENTION_TYPES = ("mamba", "mamba2", "rwkv", "xlstm", "falcon_mamba")


def text_config(config):
    """The decoder's config (a multimodal model's text part)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter else config


def check_supported(config) -> None:
    """Raise KVBenchError (one line: the model type and what kvbench cannot hold) for a model it cannot serve."""
    text = text_config(config)
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None) or "this model"
    if getattr(config, "is_encoder_decoder", False):
        raise KVBenchError(f"{model_type} is an encoder-decoder: kvbench compresses the self-attention cache of "
                           "decoder-only models; pick a decoder-only model")
    if model_type in NO_ATTENTION_TYPES:
        raise KVBenchError(f"{model_type} has no attention KV cache (a state-space/recurrent model): "
                           "kvbench compresses attention caches; pick a transformer decoder")
    for field, what in UNSUPPORTED_FIELDS.items():
        if getattr(text, field, None) is not None:
            raise KVBenchError(f"{model_type} uses {what} (config.{field}); kvbench serves full and sliding-window "
                               "attention layers only")
    kinds = set(getattr(text, "layer_types", None) or ()) - {FULL, SLIDING}
    if kinds:
        raise KVBenchError(f"{model_type} has layers of type {', '.join(sorted(kinds))} (config.layer_types); "
                           "kvbench serves full_attention and sliding_attention layers only")


def layer_windows(config) -> list[int | None]:
    """Per layer, its sliding window (a query at p sees keys p - window < pos <= p), or None (full attention)."""
    text = text_config(config)
    check_supported(config)
    n = text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is None:  # Mistral: one window for every layer, when set
        types = [SLIDING if window else FULL] * n
    if SLIDING in types and not window:
        raise KVBenchError(f"{getattr(text, 'model_type', 'the model')}: config.layer_types has sliding layers "
                           "but config.sliding_window is not set")
    return [window if kind == SLIDING else None for kind in types[:n]]
