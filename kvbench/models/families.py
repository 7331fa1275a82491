"""Tiny random models of today's decoder families, built from `AutoConfig.for_model` (nothing downloaded).

The family matrix (`python scripts/family_matrix.py`, tests/integration/test_families.py) runs every
method on each at a budget above the prompt, where kvbench must give the model's own logits and tokens:
their attention is what differs between families (sliding windows, hybrid layer patterns, logit
softcapping, attention sinks, q/k norms, mixture-of-experts MLPs), not their size.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench.engine.architecture import check_supported

WINDOW = 12  # sliding window of the tiny hybrid families: shorter than the matrix's prompts
SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
         "tie_word_embeddings": False}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

# family -> (model_type, settings on top of SMALL): what each family's attention looks like
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 4096}),  # a window longer than any prompt here
    "mistral_window": ("mistral", {"sliding_window": WINDOW}),  # Mistral-7B-v0.1's every-layer window, shorter
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),  # q/k RMS norms
    "qwen3_moe": ("qwen3_moe", {**MOE, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                          "query_pre_attn_scalar": 16}),
    "gemma3_text": ("gemma3_text", {"num_hidden_layers": 6, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {"attention_multiplier": 0.2, "logits_scaling": 2.0, "residual_multiplier": 0.5,
                            "embedding_multiplier": 4.0}),
    "gpt_oss": ("gpt_oss", {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2,
                            "layer_types": ["sliding_attention", "full_attention"] * 2}),
}
# families kvbench refuses, each with what its cache is
REFUSED: dict[str, tuple[str, dict]] = {
    "deepseek_v3": ("deepseek_v3", {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                                    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4}),
    "mamba": ("mamba", {}),
    "jamba": ("jamba", {}),
    "qwen3_next": ("qwen3_next", {}),
    "llama4_text": ("llama4_text", {}),
    "t5": ("t5", {}),
}


def tiny_config(family: str, **overrides):
    """The tiny config of `family` (a key of FAMILIES or REFUSED), with `overrides` (vocab_size, ...)."""
    if family not in FAMILIES and family not in REFUSED:
        from kvbench.errors import KVBenchError

        raise KVBenchError(f"model.tiny.family={family} is not one of: {', '.join(FAMILIES)}")
    model_type, settings = {**FAMILIES, **REFUSED}[family]
    config = AutoConfig.for_model(model_type)
    if family in FAMILIES:
        for key, value in {**SMALL, **settings, **overrides}.items():
            setattr(config, key, value)
        types = getattr(config, "layer_types", None)
        if types is not None and len(types) != config.num_hidden_layers:  # the family's pattern, repeated
            config.layer_types = [types[i % len(types)] for i in range(config.num_hidden_layers)]
    else:
        for key, value in settings.items():
            setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random fp32 model of `family` on the CPU, in eval mode, loaded with eager attention (every family
    takes it); its weights drawn with `seed`, the global RNG left as it was."""
    config = tiny_config(family, **overrides)
    check_supported(config)  # a refused family stops here, before its (full-size default) weights are built
    cpu_rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        if family == "gpt_oss":  # learned sinks: random ones, large enough to take a visible share
            for layer in model.model.layers:
                torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    finally:
        torch.random.set_rng_state(cpu_rng)
    return model.eval()


# ----------------------------------------------------------------------------- the matrix


def method_variants(head_scores: str | None = None) -> dict[str, dict]:
    """Every registered method with its defaults, and its decode-stage and shifted-position variants where
    the method takes them (a variant the method refuses is left out)."""
    from kvbench.errors import KVBenchError
    from kvbench.methods import REGISTRY, build

    variants = {}
    for name in REGISTRY:
        base = {"name": name, **({"head_scores": head_scores} if name == "headkv" else {})}
        for suffix, extra in (("", {}), ("+decode", {"stage": "decode"}), ("+shifted", {"positions": "shifted"})):
            settings = {**base, **extra}
            try:
                build(settings)
            except KVBenchError:
                continue
            if suffix and build(settings) == build(base):
                continue  # the default already is this variant
            variants[name + suffix] = settings
    return variants


@torch.inference_mode()
def compare_with_model(model, settings: dict, prompt: torch.Tensor, new_tokens: int, budget: int,
                       base: str = "sdpa") -> dict:
    """kvbench (method `settings`, `budget` tokens above everything it will hold) against the model itself:
    the largest logit difference over the prompt and every decode step, and whether the greedy tokens equal
    transformers' own `generate` (the model's own cache: a sliding layer keeps its window)."""
    from kvbench.engine import Budget, Session, install
    from kvbench.methods import build

    previous = model.config._attn_implementation
    reference = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)[0, prompt.shape[1]:].tolist()
    install(model, base)
    try:
        session = Session(model, build(settings), Budget(tokens=budget), reserve=new_tokens)
        logits = [session.prefill(prompt, logits_to_keep=0)[0]]
        tokens = []
        for _ in range(new_tokens):
            tokens.append(int(logits[-1][-1].argmax()))
            logits.append(session.step(torch.tensor([[tokens[-1]]], device=prompt.device))[0])
        kv = session.kv_summary()
    finally:
        model.set_attn_implementation(previous)
    ours = torch.cat(logits)[: prompt.shape[1] + new_tokens - 1]
    full = torch.cat([prompt, torch.tensor([tokens[:-1]], device=prompt.device)], dim=1)
    theirs = model(full).logits[0]
    return {"max_logit_diff": float((ours - theirs).abs().max()), "same_tokens": tokens == reference,
            "kv_layer_types": kv["kv_layer_types"]}
