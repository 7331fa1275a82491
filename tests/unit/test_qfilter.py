"""QFilter (Q-Filters, arXiv:2503.02812; kvpress QFilterPress): kept sets against a brute-force reference of
kvpress's score -(filter . key) with explicit loops (random inputs and the tiny models, MHA and GQA, prefill and
decode, heads: ada), the full cache above the prompt, loading filters in kvpress's layout (folder, file, hub cache)
with one-line errors, and scripts/estimate_qfilters.py (shape, round trip, the queries it reads, the direction)."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import Budget, CompressedCache, Session
from kvbench.engine.attention import kvbench_attention
from kvbench.engine.types import ModelShape
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.methods.qfilter import kvpress_repo, load_filters, save_filters
from tests.helpers import SCALING, D, FakeModule, ragged_kept
from tests.unit.test_methods import random_inputs
from tests.unit.test_scorers import ada_reference, top

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "qfilter" / "tiny"  # (2, 2, 16): the tiny GQA model's, estimated by the script


def script():
    spec = importlib.util.spec_from_file_location("estimate_qfilters", ROOT / "scripts" / "estimate_qfilters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def qfilter_scores(f, keys):
    """kvpress QFilterPress.score for one head: -(filter * key).sum(-1), as loops."""
    return [-sum(a * b for a, b in zip(f, k)) for k in keys]


def random_filters(tmp_path, layers, heads, dim, seed=0):
    return str(save_filters(tmp_path / f"filters{layers}x{heads}x{dim}",
                            torch.randn(layers, heads, dim, generator=torch.Generator().manual_seed(seed))))


# ----------------------------------------------------------------------------- kept sets


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_kept_sets_match_kvpress_score_on_random_inputs(tmp_path, hkv, stage):
    layers, n, budget = 2, 40, 16
    filters = random_filters(tmp_path, layers, hkv, D, seed=hkv)
    f = load_filters(filters)
    method = build({"name": "qfilter", "filters": filters, "stage": stage})
    config = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=hkv)
    cache = CompressedCache(SimpleNamespace(config=config), method, Budget(tokens=budget))
    for layer_idx in range(layers):
        q, k, v, decode = random_inputs(hkv, n, steps=30, seed=7 + layer_idx)
        all_k = torch.cat([k] + [d[1] for d in decode], dim=2)
        module = FakeModule("sdpa", layer_idx=layer_idx, groups=4 // hkv)
        cache.phase = "prefill"
        keys, values = cache.update(k, v, layer_idx)
        kvbench_attention(module, q, keys, values, None, scaling=SCALING, kvbench_cache=cache)

        def score(b, h, positions, layer_idx=layer_idx, all_k=all_k):
            return qfilter_scores(f[layer_idx, h].tolist(), [all_k[b, h, p].tolist() for p in positions])

        def kept(layer_idx=layer_idx):
            pos = cache.layers[layer_idx].view("pos")
            return [[sorted(pos[b, h].tolist()) for h in range(hkv)] for b in range(2)]

        held = {(b, h): list(range(n)) for b in range(2) for h in range(hkv)}
        held = {key: top(score(*key, pos), pos, budget) for key, pos in held.items()}
        assert kept() == [[held[b, h] for h in range(hkv)] for b in range(2)]
        cache.phase = "decode"
        for step, (q1, k1, v1) in enumerate(decode):
            keys, values = cache.update(k1, v1, layer_idx)
            kvbench_attention(module, q1, keys, values, None, scaling=SCALING, kvbench_cache=cache)
            for key in held:
                held[key] = held[key] + [n + step]
                if stage == "decode":  # the new token joins, the lowest score goes (the older among equals)
                    held[key] = top(score(*key, held[key]), held[key], budget)
            assert kept() == [[held[b, h] for h in range(hkv)] for b in range(2)], f"layer {layer_idx} step {step}"


def capture_keys(session):
    """The keys each layer's attention hands the cache, in order (a wrapper on this one cache object)."""
    seen = {}
    update = session.cache.update

    def recording(key_states, value_states, layer_idx, *args, **kwargs):
        seen.setdefault(layer_idx, []).append(key_states.detach().clone())
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    session.cache.update = recording
    return seen


@pytest.mark.parametrize("stage", ["prefill", "decode"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_tiny_model_kept_sets_match_kvpress_score(tmp_path, tiny_mha, tiny_gqa, kind, stage):
    model, _ = tiny_gqa if kind == "gqa" else tiny_mha
    hkv = model.config.num_key_value_heads
    filters = str(FIXTURE) if kind == "gqa" else random_filters(tmp_path, 2, 4, 16, seed=3)
    f = load_filters(filters)
    n, budget = 40, 16
    g = torch.Generator().manual_seed(5)
    prompt, steps = torch.randint(0, 128, (1, n), generator=g), torch.randint(0, 128, (10, 1, 1), generator=g)
    session = Session(model, build({"name": "qfilter", "filters": filters, "stage": stage}), Budget(tokens=budget),
                      reserve=10)
    keys = capture_keys(session)
    with torch.inference_mode():
        session.prefill(prompt)
        held = {}
        for layer in range(2):
            k = keys[layer][0][0]
            for h in range(hkv):
                held[layer, h] = top(qfilter_scores(f[layer, h].tolist(), k[h].tolist()), list(range(n)), budget)
        for step in range(len(steps) + 1):
            for layer in range(2):
                pos = session.cache.layers[layer].view("pos")[0]
                assert [sorted(pos[h].tolist()) for h in range(hkv)] == [held[layer, h] for h in range(hkv)], step
            if step == len(steps):
                break
            session.step(steps[step])
            for layer in range(2):
                all_k = torch.cat([x[0] for x in keys[layer]], dim=1)  # (kv_heads, positions, D)
                for h in range(hkv):
                    held[layer, h] = held[layer, h] + [n + step]
                    if stage == "decode":
                        positions = held[layer, h]
                        scores = qfilter_scores(f[layer, h].tolist(), [all_k[h, p].tolist() for p in positions])
                        held[layer, h] = top(scores, positions, budget)


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_heads_ada_shares_the_layer_budget_by_the_filter_scores(tmp_path, hkv):
    budget, n = 12, 40
    q, k, v, _ = random_inputs(hkv, n, steps=0, seed=11)
    filters = random_filters(tmp_path, 1, hkv, D, seed=1)
    f = load_filters(filters)
    config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=hkv)
    cache = CompressedCache(SimpleNamespace(config=config), build({"name": "qfilter", "filters": filters, "heads": "ada"}),
                            Budget(tokens=budget))
    keys, values = cache.update(k, v, 0)
    kvbench_attention(FakeModule("sdpa", groups=4 // hkv), q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    expected = [ada_reference([qfilter_scores(f[0, h].tolist(), k[b, h].tolist()) for h in range(hkv)], budget, 0.2)
                for b in range(2)]
    assert ragged_kept(cache.layers[0]) == expected
    assert build({"name": "qfilter", "filters": filters, "heads": "ada"}).label == "qfilter-ada"


def test_score_is_kvpress_expression_in_the_keys_dtype(tmp_path):
    filters = random_filters(tmp_path, 2, 2, 16, seed=4)
    method = build({"name": "qfilter", "filters": filters})
    keys = torch.randn(3, 2, 9, 16).to(torch.bfloat16)
    layer = SimpleNamespace(layer_idx=1, view=lambda name: keys)
    ours = method.prefill_scores(layer, None)
    q_filters = load_filters(filters).to(torch.bfloat16)  # kvpress: self.q_filters.to(model.dtype)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, -(q_filters[1][None, :, None] * keys).sum(dim=-1))
    assert torch.equal(method.eviction_scores(layer), ours)


# ----------------------------------------------------------------------------- the full cache above the prompt


@pytest.mark.parametrize("settings", [{"stage": "prefill"}, {"stage": "decode"}, {"heads": "ada"}])
def test_budget_above_the_prompt_gives_the_full_cache_tokens(tiny_gqa, settings):
    model, _ = tiny_gqa
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    full = Session(model, build({"name": "full"}), None, reserve=8).generate(prompt, 8).tokens[0]
    method = build({"name": "qfilter", "filters": str(FIXTURE), **settings})
    assert Session(model, method, Budget(tokens=100), reserve=8).generate(prompt, 8).tokens[0] == full
    small = Session(model, method, Budget(tokens=12), reserve=8)
    small.generate(prompt, 8)
    assert all(layer.length <= 12 + 8 for layer in small.cache.layers)


# ----------------------------------------------------------------------------- loading filters


class QFilters(torch.nn.Module):
    """kvpress's QFilters (kvpress/presses/qfilter_press.py), to write and read its hub layout."""

    def __init__(self, num_layers: int, num_kv_heads: int, kv_head_dim: int):
        super().__init__()
        self.q_filters = torch.nn.Parameter(torch.randn(num_layers, num_kv_heads, kv_head_dim))


def kvpress_class():
    from huggingface_hub import PyTorchModelHubMixin

    return type("QFilters", (QFilters, PyTorchModelHubMixin), {})


def test_kvpress_layout_loads_both_ways(tmp_path):
    cls = kvpress_class()
    theirs = cls(2, 3, 8)
    theirs.save_pretrained(tmp_path / "repo")  # model.safetensors + config.json, as the nthngdy/*_qfilt repos
    method = build({"name": "qfilter", "filters": str(tmp_path / "repo")})
    assert torch.equal(method._filters, theirs.q_filters.detach())
    ours = save_filters(tmp_path / "ours", torch.randn(2, 3, 8))  # what the estimation script writes
    assert torch.equal(cls.from_pretrained(str(ours)).q_filters.detach(), load_filters(str(ours)))
    # a lone .safetensors file and a .pt tensor
    assert torch.equal(load_filters(str(tmp_path / "repo" / "model.safetensors")), method._filters)
    torch.save(method._filters, tmp_path / "f.pt")
    assert torch.equal(load_filters(str(tmp_path / "f.pt")), method._filters)


def fake_hub_cache(root, repo, filters):
    """A Hugging Face hub cache holding `repo` at main, as `hf download` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    save_filters(folder / "snapshots" / commit, filters)


def test_hub_repo_from_the_local_cache_and_kvpress_repo_names(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    filters = torch.randn(2, 2, 16)
    fake_hub_cache(tmp_path / "hub", "nthngdy/Llama-3.1-8B-Instruct_qfilt", filters)
    # empty filters: kvpress's repo id from the model's name (Meta-Llama written Llama)
    method = build({"name": "qfilter", "model_path": "meta-llama/Meta-Llama-3.1-8B-Instruct"})
    assert method.filters == "nthngdy/Llama-3.1-8B-Instruct_qfilt"
    assert torch.equal(method._filters, filters)
    assert torch.equal(build({"name": "qfilter", "filters": "nthngdy/Llama-3.1-8B-Instruct_qfilt"})._filters, filters)
    assert kvpress_repo("meta-llama/Llama-3.1-8B-Instruct") == "nthngdy/Llama-3.1-8B-Instruct_qfilt"
    assert kvpress_repo("meta-llama/Meta-Llama-3.1-405B-Instruct") == "nthngdy/Meta-Llama-3.1-405B-Instruct_qfilt"
    assert kvpress_repo("Qwen/Qwen2.5-7B-Instruct") == "nthngdy/Qwen2.5-7B-Instruct_qfilt"
    assert kvpress_repo("/models/Meta-Llama-3-8B-Instruct/") == "nthngdy/Llama-3-8B-Instruct_qfilt"


def test_missing_filters_are_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    cases = [
        ({"filters": str(tmp_path / "none")}, r"Q-Filters file .*none not found: .*scripts/estimate_qfilters"),
        ({"filters": "nthngdy/Nope-7B_qfilt"}, r"nthngdy/Nope-7B_qfilt are not in the local Hugging Face cache .*"
                                               r"hf download nthngdy/Nope-7B_qfilt.*scripts/estimate_qfilters.py"),
        ({"model_path": "mistralai/Mistral-7B-Instruct-v0.3"}, r"nthngdy/Mistral-7B-Instruct-v0.3_qfilt are not in"),
        ({}, r"method.filters=DIR .*scripts/estimate_qfilters.py"),
    ]
    for settings, message in cases:
        with pytest.raises(KVBenchError, match=message) as err:
            build({"name": "qfilter", **settings})
        assert "\n" not in str(err.value)


def test_filters_of_another_shape_are_one_line(tmp_path, tiny_mha, tiny_gqa):
    model, _ = tiny_mha  # 4 KV heads; the fixture is the GQA model's (2 KV heads)
    method = build({"name": "qfilter", "filters": str(FIXTURE)})
    with pytest.raises(KVBenchError, match=r"are 2 layers x 2 KV heads x 16 head_dim but the model's layer 0 has 4 KV "
                                           r"heads x 16 head_dim: .*scripts/estimate_qfilters.py") as err:
        Session(model, method, Budget(tokens=8)).prefill(torch.randint(0, 128, (1, 20)))
    assert "\n" not in str(err.value)
    method.check_model(ModelShape(2, 4, 2), 16)
    with pytest.raises(KVBenchError, match=r"are 2 layers x 2 KV heads x 16 head_dim but the model has 30 x 3 x 64"):
        method.check_model(ModelShape(30, 9, 3), 64)
    one_layer = build({"name": "qfilter", "filters": random_filters(tmp_path, 1, 2, 16)})
    with pytest.raises(KVBenchError, match="model's layer 1 has"):  # the model has more layers than the filters
        Session(tiny_gqa[0], one_layer, Budget(tokens=8)).prefill(torch.randint(0, 128, (1, 20)))
    bad = save_filters(tmp_path / "bad", torch.randn(2, 2, 16))
    (bad / "config.json").write_text('{"num_layers": 2, "num_kv_heads": 4, "kv_head_dim": 16}')
    with pytest.raises(KVBenchError, match=r"config.json says \(2, 4, 16\) but model.safetensors holds \(2, 2, 16\)"):
        build({"name": "qfilter", "filters": str(bad)})
    torch.save(torch.randn(4, 16), tmp_path / "flat.pt")
    with pytest.raises(KVBenchError, match="holds no \\(layers, kv_heads, head_dim\\) tensor"):
        build({"name": "qfilter", "filters": str(tmp_path / "flat.pt")})


def test_config_takes_the_models_hub_id():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvbench.resources import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=qfilter", "model=llama3.1-8b-instruct"])
    method = OmegaConf.to_container(cfg, resolve=True)["method"]
    assert method["model_path"] == "meta-llama/Llama-3.1-8B-Instruct" and method["filters"] == ""


# ----------------------------------------------------------------------------- the estimation script


def test_principal_direction_and_its_sign_on_a_synthetic_case():
    principal_filters = script().principal_filters
    g = torch.Generator().manual_seed(0)
    u0 = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    for mean in (2.0, -2.0):
        a = mean + 0.5 * torch.randn(500, 1, generator=g)
        q = a * u0 + 0.3 * torch.randn(500, 16, generator=g)  # queries spread along u0, mean side `mean`
        f = principal_filters(q.T.double() @ q.double(), q.sum(0))
        u = -f  # the stored filter is -u, u oriented so that mean(q . u) > 0
        assert abs(float(u.norm()) - 1) < 1e-6
        assert float(u @ u0) * (1 if mean > 0 else -1) > 0.99
        assert float((q @ u).mean()) > 0
        vh = torch.linalg.svd(q)[2][0]  # the first right singular vector, up to sign
        assert torch.allclose(u, vh * torch.sign(vh @ u), atol=1e-4)


def test_estimation_reads_the_queries_after_rope_per_gqa_group(tiny_gqa):
    """The collector's Q^T Q equals one computed from q_proj's output rotated with transformers' own RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    est = script()
    model, _ = tiny_gqa
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    collector = est.QueryCollector()
    projected = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, idx=idx: projected.__setitem__(idx, o))
             for idx, layer in enumerate(model.model.layers)]
    try:
        with torch.inference_mode():
            Session(model, collector, None).prefill(ids)
            cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(30)[None])
    finally:
        for hook in hooks:
            hook.remove()
    for idx in range(2):
        q = projected[idx].view(1, 30, 4, 16).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        q = q[0].double()  # (4 query heads, 30, 16); KV head h serves query heads 2h, 2h + 1
        for h in range(2):
            rows = q[2 * h: 2 * h + 2].reshape(-1, 16)
            torch.testing.assert_close(collector.gram[idx][h], rows.T @ rows, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(collector.total[idx][h], rows.sum(0), rtol=1e-5, atol=1e-5)
        assert collector.count[idx] == 60


def test_estimation_script_writes_filters_the_method_runs_with(tmp_path, tiny_gqa, capsys):
    est = script()
    out = tmp_path / "qf"
    assert est.main(["--model", "tiny-random", "--max-tokens", "600", "--length", "250", "--out", str(out),
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "estimation.json", "model.safetensors"]
    filters = load_filters(str(out))
    assert filters.shape == (2, 2, 16) and torch.allclose(filters.norm(dim=-1), torch.ones(2, 2))
    model, _ = tiny_gqa  # the same weights as tiny-random
    method = build({"name": "qfilter", "filters": str(out)})
    session = Session(model, method, Budget(tokens=12), reserve=4)
    session.generate(torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0)), 4)
    assert [layer.length for layer in session.cache.layers] == [15, 15]  # 12 + the 3 tokens fed back
    assert est.main(["--model", "tiny-random", "--text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "--text" in capsys.readouterr().err and not (tmp_path / "x").exists()
