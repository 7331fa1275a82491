"""Expected Attention (kvpress ExpectedAttentionPress) against a brute-force reference written from kvpress's
press: explicit loops over tokens and channels, RoPE from its formula, the queries before RoPE as kvpress
takes them; kept sets at the prompt cut, MHA and GQA, fp32, every switch. Also the engine's queries before
RoPE (`StatsRequest.queries`), and the method on a real tiny model against kvpress's score transcribed in torch
from the hidden states (q_proj recomputed, as kvpress does)."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, repeat_kv

from kvbench.engine import Budget, CompressedCache, Session
from kvbench.engine.attention import kvbench_attention, prerope_queries
from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.methods.base import Method
from tests.helpers import SCALING, D, FakeModule, dot
from tests.unit.test_methods import engine_kept

THETA = 10000.0


def rotary_config(**rope):
    return LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D, max_position_embeddings=256,
                       rope_parameters={"rope_type": "default", "rope_theta": THETA, **rope})


def fake_model(rotary):
    decoder = SimpleNamespace(rotary_emb=rotary)
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1), get_decoder=lambda: decoder)


def rotate(x, positions, rotary):
    cos, sin = rotary(x, positions[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


# ----------------------------------------------------------------------------- brute force, from kvpress


def angle(t, c):
    """The RoPE angle of channel c at position t (Llama default: theta^(-2i/D), channels i and i + D/2)."""
    return t * THETA ** (-2 * (c % (D // 2)) / D)


def average_rotation(start, n_future):
    """mean_t R_t, R_t x = x cos + rotate_half(x) sin at position t."""
    half = D // 2
    R = [[0.0] * D for _ in range(D)]
    for t in range(start, start + n_future):
        for i in range(D):
            R[i][i] += math.cos(angle(t, i)) / n_future
            if i < half:
                R[i][i + half] -= math.sin(angle(t, i + half)) / n_future
            else:
                R[i][i - half] += math.sin(angle(t, i - half)) / n_future
    return R


def matvec(M, x):
    return [dot(row, x) for row in M]


def expected_attention_scores(raw_q, keys, values, n_sink=4, n_future=512, use_covariance=True, use_vnorm=True,
                              epsilon=0.0):
    """kvpress ExpectedAttentionPress.score, one sequence: raw_q [query head][token][channel] before RoPE,
    keys/values [kv head][token][channel]; returns [kv head][token]."""
    hq, hkv, n = len(raw_q), len(keys), len(keys[0])
    groups = hq // hkv
    R = average_rotation(n, n_future)
    out = []
    for h in range(hkv):
        mean_attn = [0.0] * n
        for g in range(groups):
            qs = raw_q[h * groups + g][n_sink:]
            mu = [sum(q[c] for q in qs) / len(qs) for c in range(D)]
            cov = [[sum((q[a] - mu[a]) * (q[b] - mu[b]) for q in qs) / len(qs) for b in range(D)] for a in range(D)]
            mu_r = matvec(R, mu)
            cov_r = [[sum(R[a][i] * cov[i][j] * R[b][j] for i in range(D) for j in range(D)) for b in range(D)]
                     for a in range(D)]
            logits = []
            for j in range(n_sink, n):
                k = keys[h][j]
                z = dot(k, mu_r) / math.sqrt(D)
                if use_covariance:
                    z += sum(k[a] * cov_r[a][b] * k[b] for a in range(D) for b in range(D)) / D / 2
                logits.append(z)
            top = max(logits)
            exps = [math.exp(z - top) for z in logits]
            for j, e in zip(range(n_sink, n), exps):
                mean_attn[j] += e / sum(exps) / groups
        if use_vnorm:
            mean_attn = [(a + epsilon) * math.sqrt(dot(v, v)) for a, v in zip(mean_attn, values[h])]
        out.append(mean_attn)
    top = max(s for row in out for s in row[n_sink:])
    return [[top + 1 if j < n_sink else row[j] for j in range(n)] for row in out]


def top(scores, budget):
    """The kept positions: highest score first, the more recent among equals."""
    order = sorted(range(len(scores)), key=lambda j: (scores[j], j), reverse=True)
    return sorted(order[:budget])


def inputs(hkv, n, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, 4, n, D, generator=g) + torch.randn(2, 4, 1, D, generator=g)  # a shared mean per head
    k = torch.randn(2, hkv, n, D, generator=g) * 1.5
    v = torch.randn(2, hkv, n, D, generator=g) * torch.rand(2, hkv, n, 1, generator=g) * 3
    return raw, k, v


def engine_cache(cfg, budget, raw, k, v, rotary):
    cache = CompressedCache(fake_model(rotary), build(cfg), Budget(tokens=budget))
    n = k.shape[2]
    cache.next_position_ids(n)  # as Session does: the prompt at positions 0..n-1
    keys, values = cache.update(k, v, 0)
    q = rotate(raw, torch.arange(n), rotary)
    kvbench_attention(FakeModule("sdpa", groups=4 // k.shape[1]), q, keys, values, None, scaling=SCALING,
                      kvbench_cache=cache)
    return cache


SETTINGS = [
    {},
    {"use_covariance": False},
    {"use_vnorm": False},
    {"epsilon": 0.05},
    {"n_sink": 0, "n_future_positions": 7},
    {"n_sink": 2, "n_future_positions": 64, "use_covariance": False, "use_vnorm": False},
]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_prefill_kept_sets_match_kvpress_reference(hkv, settings):
    n, budget = 40, 14
    raw, k, v = inputs(hkv, n, seed=11 + hkv + len(settings))
    cache = engine_cache({"name": "expected_attention", **settings}, budget, raw, k, v, LlamaRotaryEmbedding(rotary_config()))
    ref_options = {"n_sink": settings.get("n_sink", 4), "n_future": settings.get("n_future_positions", 512),
                   **{key: settings[key] for key in ("use_covariance", "use_vnorm", "epsilon") if key in settings}}
    expected = []
    for b in range(2):
        scores = expected_attention_scores(raw[b].tolist(), k[b].tolist(), v[b].tolist(), **ref_options)
        expected.append([top(row, budget) for row in scores])
    assert engine_kept(cache) == expected


def test_budget_above_prompt_and_short_prompts_keep_everything():
    rotary = LlamaRotaryEmbedding(rotary_config())
    raw, k, v = inputs(2, 20, seed=3)
    cache = engine_cache({"name": "expected_attention"}, 64, raw, k, v, rotary)
    assert engine_kept(cache) == [[list(range(20))] * 2] * 2
    torch.testing.assert_close(cache.layers[0].keys[:, :, :20], k)
    raw, k, v = inputs(2, 4, seed=4)  # no query after the sinks: nothing to estimate, the newest are kept
    cache = engine_cache({"name": "expected_attention"}, 2, raw, k, v, rotary)
    assert engine_kept(cache) == [[[2, 3]] * 2] * 2


def test_settings_are_checked():
    for bad in ({"n_future_positions": 0}, {"n_sink": -1}, {"epsilon": -1.0}):
        with pytest.raises(KVBenchError, match="method.n_future_positions"):
            build({"name": "expected_attention", **bad})
    with pytest.raises(KVBenchError, match="method.stage=prefill"):
        build({"name": "expected_attention", "stage": "decode"})


# ----------------------------------------------------------------------------- the engine's queries before RoPE


class Recorder(Method):
    """Asks for the queries before RoPE and keeps what the engine gives."""

    def stats_request(self, phase):
        return StatsRequest(queries=True)

    def prefill_scores(self, layer, stats):
        self.stats = stats
        return None


@pytest.mark.parametrize("rope", [{}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}],
                         ids=["default", "yarn"])
def test_stats_queries_are_the_queries_before_rope(rope):
    rotary = LlamaRotaryEmbedding(rotary_config(**rope))
    assert (rotary.attention_scaling != 1.0) == bool(rope)  # yarn: the tables carry a scaling
    raw, k, v = inputs(2, 30, seed=5)
    recorder = Recorder()
    cache = CompressedCache(fake_model(rotary), recorder, Budget(tokens=8))
    cache.next_position_ids(30)
    keys, values = cache.update(k, v, 0)
    kvbench_attention(FakeModule("sdpa", groups=2), rotate(raw, torch.arange(30), rotary), keys, values, None,
                      scaling=SCALING, kvbench_cache=cache)
    stats = recorder.stats
    torch.testing.assert_close(stats.queries, raw, atol=1e-5, rtol=1e-5)
    positions = torch.tensor([0, 7, 600])
    cos, sin = rotary(raw, positions[None])
    torch.testing.assert_close(stats.rope(positions), (cos[0], sin[0]))
    # at later positions (a question after a context), and block by block
    later = SimpleNamespace(rotary=rotary, position_end=70, layers=[SimpleNamespace(layer_type="full_attention")])
    queries, _ = prerope_queries(later, 0, rotate(raw, torch.arange(40, 70), rotary))
    torch.testing.assert_close(queries, raw, atol=1e-5, rtol=1e-5)
    with pytest.raises(KVBenchError, match="rotary"):
        prerope_queries(SimpleNamespace(rotary=None), 0, raw)


def test_half_width_tables_are_widened():
    """gpt-oss's RoPE returns (n, D/2) tables and rotates the two halves as rotate_half does."""
    full = LlamaRotaryEmbedding(rotary_config())

    def half(x, ids):
        cos, sin = full(x, ids)
        return cos[..., : D // 2], sin[..., : D // 2]

    raw = torch.randn(1, 2, 12, D)
    cache = SimpleNamespace(rotary=half, position_end=12, layers=[SimpleNamespace(layer_type="full_attention")])
    queries, rope = prerope_queries(cache, 0, rotate(raw, torch.arange(12), full))
    torch.testing.assert_close(queries, raw, atol=1e-5, rtol=1e-5)
    assert rope(torch.arange(3))[0].shape == (3, D)


# ----------------------------------------------------------------------------- a real model against kvpress


def kvpress_score(module, rotary, hidden, keys, values, n_sink=4, n_future=512):
    """ExpectedAttentionPress.score (defaults: covariance, value norms), transcribed: the queries before RoPE
    recomputed from the layer's input hidden states with q_proj, as kvpress's get_prerope_query_states."""
    bsz, q_len, _ = hidden.shape
    heads, head_dim = module.config.num_attention_heads, module.head_dim
    keys, values = keys[:, :, n_sink:], values[:, :, n_sink:]
    q = module.q_proj(hidden[:, n_sink:]).view(bsz, q_len - n_sink, heads, head_dim).transpose(1, 2)
    mu = q.mean(dim=2, keepdim=True)
    centered = q - mu
    cov = torch.einsum("bnsi,bnsj->bnij", centered, centered) / (q_len - n_sink)
    mu = mu.squeeze(2)
    cos, sin = rotary(mu, torch.arange(q_len, q_len + n_future)[None])
    cos, sin = cos[0], sin[0]
    eye = torch.eye(head_dim)
    P = torch.zeros(head_dim, head_dim)
    P[head_dim // 2 :, : head_dim // 2], P[: head_dim // 2, head_dim // 2 :] = torch.eye(head_dim // 2), -torch.eye(
        head_dim // 2)
    R = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * P).mean(dim=0)
    mu, cov = mu @ R.T, R @ cov @ R.T
    hkv = keys.shape[1]
    keys = repeat_kv(keys, heads // hkv).transpose(2, 3)
    scores = torch.matmul(mu.unsqueeze(2), keys).squeeze(2) / math.sqrt(head_dim)
    scores = scores + torch.einsum("bhin, bhij, bhjn->bhn", keys, cov, keys) / head_dim / 2
    scores = scores.softmax(dim=-1).view(bsz, hkv, heads // hkv, -1).mean(dim=2)
    scores = scores * values.norm(dim=-1)
    return torch.nn.functional.pad(scores, (n_sink, 0), value=scores.max().item() + 1)


@torch.inference_mode()
def test_tiny_model_matches_kvpress_score_from_hidden_states(tiny_gqa):
    model, _ = tiny_gqa  # kvbench's attention installed (kvbench.models.load)
    decoder = model.get_decoder()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(2))
    hidden = {}

    def keep_input(module, args, kwargs):  # the first call per layer: the full model's prompt pass
        hidden.setdefault(module.layer_idx, kwargs["hidden_states"])

    hooks = [layer.self_attn.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in decoder.layers]
    try:
        full = Session(model, build({"name": "full"}), None)
        full.prefill(ids)
        session = Session(model, build({"name": "expected_attention"}), Budget(tokens=20))
        session.prefill(ids)
    finally:
        for hook in hooks:
            hook.remove()
    for i, layer in enumerate(decoder.layers):
        kv = full.cache.layers[i]
        scores = kvpress_score(layer.self_attn, decoder.rotary_emb, hidden[i], kv.keys[:, :, : kv.length],
                               kv.values[:, :, : kv.length])
        expected = scores.topk(20, dim=-1).indices.sort(dim=-1).values.tolist()
        assert engine_kept(SimpleNamespace(layers=[session.cache.layers[i]])) == expected, f"layer {i}"


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "gpt_oss", "phi3", "olmo2"])
@torch.inference_mode()
def test_queries_before_rope_equal_the_projection_in_every_rope_family(family):
    """Stats.queries against each layer's query projection (its q norm included: Qwen3 and Gemma 3 per head,
    OLMo 2 over the projection; Phi-3's fused qkv): RoPE undone with the right tables (Gemma 3: one RoPE per
    layer type; gpt-oss: half-width YaRN tables with an attention scaling)."""
    from kvbench.engine import install
    from kvbench.models.families import tiny_model

    model = tiny_model(family, num_hidden_layers=2 if family != "gemma3_text" else 6)
    install(model, "sdpa")
    projected = {}

    def keep(i):
        def hook(module, args, output):
            projected.setdefault(i, output)
        return hook

    hooks = []
    for i, layer in enumerate(model.get_decoder().layers):
        attn = layer.self_attn
        part = getattr(attn, "q_norm", None) or getattr(attn, "q_proj", None) or attn.qkv_proj
        hooks.append(part.register_forward_hook(keep(i)))

    class Every(Recorder):
        def prefill_scores(self, layer, stats):
            self.seen = {**getattr(self, "seen", {}), layer.layer_idx: stats.queries}

    recorder = Every()
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    try:
        Session(model, recorder, Budget(tokens=8)).prefill(ids)
    finally:
        for hook in hooks:
            hook.remove()
    for i, queries in recorder.seen.items():
        heads, dim = queries.shape[1], queries.shape[3]
        raw = projected[i]
        if raw.shape[1:3] != (heads, 24):  # Gemma 3 norms the queries after the transpose, the others before
            raw = raw[..., : heads * dim].reshape(1, 24, heads, dim).transpose(1, 2)
        torch.testing.assert_close(queries, raw, atol=1e-4, rtol=1e-4, msg=f"{family} layer {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_rotation_is_kvpress_bit_for_bit(dtype):
    """kvpress builds the (n, D, D) rotations and averages them; kvbench averages the tables: the same numbers."""
    from kvbench.methods.expected_attention import average_rotation

    dim = 64
    config = LlamaConfig(hidden_size=9 * dim, num_attention_heads=9, head_dim=dim,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), torch.arange(1000, 1512)[None])
    cos, sin = cos[0], sin[0]
    eye = torch.eye(dim, dtype=dtype)
    P = torch.zeros(dim, dim, dtype=dtype)
    P[dim // 2 :, : dim // 2], P[: dim // 2, dim // 2 :] = torch.eye(dim // 2), -torch.eye(dim // 2)
    assert torch.equal(average_rotation(cos, sin), (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * P).mean(dim=0))
