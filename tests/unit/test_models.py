import filecmp

import pytest
import torch

from kvbench.errors import KVBenchError
from kvbench.models import load, wrap_chat
from kvbench.models.loading import BYTE_TOKENIZER_DIR, build_byte_tokenizer
from tests.conftest import tiny_cfg


def test_shipped_tokenizer_is_what_the_builder_writes(tmp_path):
    build_byte_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / name, BYTE_TOKENIZER_DIR / name, shallow=False), name


def test_byte_tokenizer_round_trips_and_adds_bos(tiny_gqa):
    _, tok = tiny_gqa
    text = "Pass key 12345.\nünïcode ✓"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tiny_model_is_deterministic_by_seed():
    a, _ = load(tiny_cfg())
    b, _ = load(tiny_cfg())
    c, _ = load({**tiny_cfg(), "seed": 1})
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.inference_mode():
        la, lb, lc = (m(ids).logits for m in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.equal(la, lc)
    assert a.config._attn_implementation == "kvbench"
    assert a.config.kvbench_base_attention == "sdpa"


def test_unknown_attention_and_missing_flash_attn_are_clear():
    with pytest.raises(KVBenchError, match="one of: sdpa, eager, flash_attention_2"):
        load({**tiny_cfg(), "attn_implementation": "xformers"})
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        with pytest.raises(KVBenchError, match=r"pip install -e '.\[gpu\]'"):
            load({**tiny_cfg(), "attn_implementation": "flash_attention_2"})


def test_model_missing_offline_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = {"name": "llama2-7b-chat", "path": "meta-llama/Llama-2-7b-chat-hf", "device": "cpu", "dtype": "float32"}
    with pytest.raises(KVBenchError, match="hf download meta-llama/Llama-2-7b-chat-hf"):
        load(cfg)
    with pytest.raises(KVBenchError, match="no config.json"):
        load({**cfg, "path": str(tmp_path / "nowhere")})


def test_local_model_folder_loads(tmp_path, tiny_gqa):
    model, tok = tiny_gqa
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load({"name": "local", "path": str(tmp_path), "device": "cpu", "dtype": "float32"})
    ids = torch.tensor([[1, 40, 41]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tok("abc").input_ids == tok("abc").input_ids


def test_chat_formats():
    assert wrap_chat("Q?", "llama2") == "[INST]Q?[/INST]"
    assert wrap_chat("Q?", "vicuna").endswith(" USER: Q? ASSISTANT:")
    assert wrap_chat("Q?", "vicuna").startswith("A chat between a curious user")
    assert wrap_chat("Q?", "none") == "Q?"
    with pytest.raises(KVBenchError):
        wrap_chat("Q?", "alpaca")


def test_shipped_asset_model_loads(tmp_path, monkeypatch, tiny_gqa):
    import kvbench.models.loading as models

    model, tok = tiny_gqa
    (tmp_path / "tiny-llama").mkdir()
    model.save_pretrained(tmp_path / "tiny-llama")
    tok.save_pretrained(tmp_path / "tiny-llama")
    monkeypatch.setattr(models, "ASSETS_DIR", tmp_path)
    loaded, _ = load({"name": "tiny", "asset": "tiny-llama", "device": "cpu", "dtype": "float32"})
    ids = torch.tensor([[1, 40, 41]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(KVBenchError, match="scripts/train_tiny.py"):
        load({"name": "tiny", "asset": "nope", "device": "cpu", "dtype": "float32"})


def test_chat_template_kwargs_reach_the_template():
    """Qwen3's template takes enable_thinking: model.chat_template_kwargs renders it (thinking off for LongBench)."""
    from transformers import AutoTokenizer

    from kvbench.models.loading import BYTE_TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(BYTE_TOKENIZER_DIR))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
                         "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    assert wrap_chat("Q?", "tokenizer", tok) == "<user>Q?<assistant>"
    assert wrap_chat("Q?", "tokenizer", tok, {"enable_thinking": False}) == "<user>Q?<assistant><think></think>"


TODAYS_MODELS = {  # config -> (hub id, max_prompt_tokens)
    "llama3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", 31500),
    "mistral-7b-instruct-v0.3": ("mistralai/Mistral-7B-Instruct-v0.3", 31500),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", 31500),
    "qwen3-8b": ("Qwen/Qwen3-8B", 31500),
    "gemma3-12b-it": ("google/gemma-3-12b-it", 31500),
    "phi3.5-mini-instruct": ("microsoft/Phi-3.5-mini-instruct", 31500),
    "gpt-oss-20b": ("openai/gpt-oss-20b", 31500),
}


@pytest.mark.parametrize("name", list(TODAYS_MODELS))
def test_todays_model_configs(name):
    import yaml

    from kvbench.resources import CONFIG_DIR

    cfg = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    assert (cfg["name"], (cfg["path"], cfg["max_prompt_tokens"])) == (name, TODAYS_MODELS[name])
    assert cfg["chat_format"] == "tokenizer" and cfg["attn_implementation"] == "sdpa"
    if name == "qwen3-8b":
        assert cfg["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("name,kinds", [("tiny-gemma3", {"sliding_attention": 5, "full_attention": 1}),
                                        ("tiny-gpt-oss", {"sliding_attention": 2, "full_attention": 2})])
def test_tiny_family_models_load_with_their_layer_types(name, kinds):
    import yaml

    from kvbench.engine.architecture import layer_windows
    from kvbench.resources import CONFIG_DIR

    cfg = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    cfg.update(device="cpu", seed=0)
    model, tok = load(cfg)
    windows = layer_windows(model.config)
    assert {k: sum((w is None) == (k == "full_attention") for w in windows) for k in kinds} == kinds
    assert model.config.vocab_size == len(tok) and model.config.kvbench_base_attention == "sdpa"


def test_a_saved_gemma2_folder_loads_though_gemma2_refuses_sdpa(tmp_path):
    """Gemma 2 (and gpt-oss) raise at from_pretrained(attn_implementation="sdpa"): kvbench loads every model
    with eager, then runs its own attention on the base the config asks for."""
    from transformers import AutoTokenizer

    from kvbench.models.families import tiny_model
    from kvbench.models.loading import BYTE_TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(BYTE_TOKENIZER_DIR))
    tiny_model("gemma2", vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = load({"name": "g2", "path": str(tmp_path), "device": "cpu", "dtype": "float32",
                     "attn_implementation": "sdpa"})
    assert model.config.kvbench_base_attention == "sdpa" and model.config._attn_implementation == "kvbench"


def test_longbench_prompts_take_the_chat_template_kwargs():
    from transformers import AutoTokenizer

    from kvbench.models.loading import BYTE_TOKENIZER_DIR
    from kvbench.tasks.longbench import build_prompt

    tok = AutoTokenizer.from_pretrained(str(BYTE_TOKENIZER_DIR))
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    sample = {"context": "C", "input": "Q"}
    prompt, _ = build_prompt(sample, "qasper", tok, None, "tokenizer", {"enable_thinking": False})
    assert prompt.endswith("<think></think>")
    assert not build_prompt(sample, "qasper", tok, None, "tokenizer")[0].endswith("</think>")
