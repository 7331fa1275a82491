"""Attention as today's families define it (issue 21): sliding windows, logit softcapping, attention sinks,
and keys whose positions have gaps, against explicit loops; and the models kvbench refuses."""

import math

import pytest
import torch

from kvbench.engine.architecture import check_supported, layer_windows
from kvbench.engine.attention import LayerAttention, attention_column_sums, compute_stats, kvbench_attention
from kvbench.engine.ragged import RaggedKV
from kvbench.engine.types import StatsRequest
from kvbench.errors import KVBenchError
from kvbench.models.families import REFUSED, tiny_config
from tests.helpers import FakeModule


def loop_probs(query, key, attn: LayerAttention, q_pos, key_pos):
    """probs[b, h, i, j] with explicit loops: scaled logits, softcap, window and causal rule on positions,
    the sink (per query head) in the denominator only. key_pos: (b, hkv, kv) lists."""
    b, hq, q, _ = query.shape
    hkv, kv = key.shape[1], key.shape[2]
    out = torch.zeros(b, hq, q, kv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(q):
                p = q_pos[i]
                seen = [j for j in range(kv) if key_pos[bi][kh][j] <= p
                        and (not attn.window or key_pos[bi][kh][j] > p - attn.window)]
                logits = {}
                for j in seen:
                    x = float(query[bi, h, i].double() @ key[bi, kh, j].double()) * attn.scaling
                    logits[j] = attn.softcap * math.tanh(x / attn.softcap) if attn.softcap else x
                extra = [float(attn.sinks[h])] if attn.sinks is not None else []
                top = max(list(logits.values()) + extra)
                total = sum(math.exp(x - top) for x in list(logits.values()) + extra)
                for j, x in logits.items():
                    out[bi, h, i, j] = math.exp(x - top) / total
    return out


SEMANTICS = {
    "plain": dict(window=None, softcap=None, sinks=False),
    "window": dict(window=4, softcap=None, sinks=False),
    "softcap": dict(window=None, softcap=2.0, sinks=False),
    "sinks": dict(window=None, softcap=None, sinks=True),
    "gemma2": dict(window=5, softcap=1.5, sinks=False),
    "gpt_oss": dict(window=3, softcap=None, sinks=True),
}


def make(kind, hq=4, hkv=2, q=6, kv=11, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = SEMANTICS[kind]
    attn = LayerAttention(d**-0.5 * 3, window=spec["window"], softcap=spec["softcap"],
                          sinks=torch.randn(hq, generator=g) * 2 if spec["sinks"] else None)
    query = torch.randn(2, hq, q, d, generator=g)
    key = torch.randn(2, hkv, kv, d, generator=g)
    value = torch.randn(2, hkv, kv, d, generator=g)
    return attn, query, key, value


def gapped_positions(b, hkv, kv, q, seed=1):
    """Cached keys at distinct increasing-but-gapped positions per head (a method's choice), in shuffled
    slots, then the q new tokens in order: (key_pos tensor, end)."""
    g = torch.Generator().manual_seed(seed)
    cached = kv - q
    end = cached * 2 + q
    rows = []
    for _ in range(b):
        heads = []
        for _ in range(hkv):
            chosen = torch.randperm(end - q, generator=g)[:cached]
            heads.append(torch.cat([chosen, torch.arange(end - q, end)]))
        rows.append(torch.stack(heads))
    return torch.stack(rows), end


@pytest.mark.parametrize("kind", list(SEMANTICS))
@pytest.mark.parametrize("gapped", [False, True])
def test_column_sums_window_row_and_output_match_loops(kind, gapped):
    attn, query, key, value = make(kind)
    b, hq, q, _ = query.shape
    hkv, kv = key.shape[1], key.shape[2]
    if gapped:
        key_pos, end = gapped_positions(b, hkv, kv, q)
        positions = (key_pos, end)
    else:
        key_pos, end = torch.arange(kv).expand(b, hkv, kv), kv
        positions = None
    probs = loop_probs(query, key, attn, list(range(end - q, end)), key_pos.tolist())
    group = hq // hkv
    colsum, out = attention_column_sums(query, key, attn, block=2, value=value, positions=positions)
    expected_sums = probs.sum(dim=2).view(b, hkv, group, kv).mean(dim=2)
    torch.testing.assert_close(colsum.double(), expected_sums, atol=1e-5, rtol=1e-5)
    expected_out = torch.einsum("bhqk,bhkd->bqhd", probs, value.double().repeat_interleave(group, dim=1))
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    stats = compute_stats(StatsRequest(window=3, per_query_head=True), query, key, attn, positions)
    torch.testing.assert_close(stats.window.double(), probs[:, :, -3:].mean(dim=2), atol=1e-5, rtol=1e-5)
    # the decode row: the last query alone on the keys up to it
    last = attention_column_sums(query[:, :, -1:], key, attn, positions=positions)
    torch.testing.assert_close(last.double(), probs[:, :, -1].view(b, hkv, group, kv).mean(dim=2), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", list(SEMANTICS))
def test_kvbench_attention_runs_every_layer_kind_on_any_base(base, kind):
    """sdpa cannot softcap or take sinks: kvbench computes those layers itself, never a traceback."""
    attn, query, key, value = make(kind, q=7, kv=7)
    out, _ = kvbench_attention(FakeModule(base, groups=2), query, key, value, None, scaling=attn.scaling,
                               sliding_window=attn.window, softcap=attn.softcap, s_aux=attn.sinks)
    probs = loop_probs(query, key, attn, list(range(7)), torch.arange(7).expand(2, 2, 7).tolist())
    expected = torch.einsum("bhqk,bhkd->bqhd", probs, value.double().repeat_interleave(2, dim=1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["softcap", "sinks"])
def test_ragged_attention_softcaps_and_sinks_like_loops(kind):
    """The per-head store on a full layer of Gemma 2 (softcap) or gpt-oss (sinks)."""
    attn, query, key, value = make(kind, q=1, kv=9)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 2, 8, generator=g) < 0.6
    keep[..., 0] = True
    store = RaggedKV(key[:, :, :8], value[:, :, :8], keep, torch.arange(8).expand(2, 2, 8), reserve=2)
    store.append(key[:, :, 8:], value[:, :, 8:])
    out = store.attention(query, attn)
    full_keep = torch.cat([keep, torch.ones(2, 2, 1, dtype=torch.bool)], dim=-1)
    # the loops on the kept keys only: hidden keys get a position after the query
    key_pos = torch.where(full_keep, torch.arange(9).expand(2, 2, 9), torch.full((2, 2, 9), 99))
    probs = loop_probs(query, key, attn, [8], key_pos.tolist())
    expected = torch.einsum("bhqk,bhkd->bqhd", probs, value.double().repeat_interleave(2, dim=1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_layer_windows_follow_the_config():
    gemma3 = tiny_config("gemma3_text")
    assert layer_windows(gemma3) == [12] * 5 + [None]
    assert layer_windows(tiny_config("mistral_window")) == [12] * 4  # one window on every layer
    assert layer_windows(tiny_config("gpt_oss")) == [12, None, 12, None]
    assert layer_windows(tiny_config("qwen2")) == [None] * 4  # a sliding_window field, but no sliding layer


@pytest.mark.parametrize("family,names", [
    ("deepseek_v3", "multi-head latent attention"), ("mamba", "mamba"), ("jamba", "state-space"),
    ("qwen3_next", "linear_attention"), ("llama4_text", "chunked_attention"), ("t5", "encoder-decoder"),
])
def test_families_kvbench_cannot_serve_are_refused_in_one_line(family, names):
    assert family in REFUSED
    with pytest.raises(KVBenchError) as error:
        check_supported(tiny_config(family))
    message = str(error.value)
    assert names in message and "\n" not in message


def test_install_refuses_a_model_kvbench_cannot_serve_before_any_sample():
    from types import SimpleNamespace

    from kvbench.engine import install

    model = SimpleNamespace(config=tiny_config("deepseek_v3"))
    with pytest.raises(KVBenchError, match="kv_lora_rank"):
        install(model, "sdpa")


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("gapped", [False, True])
@pytest.mark.parametrize("q", [1, 4])
def test_base_attention_masks_a_window_by_position(base, gapped, q):
    """A plain sliding layer runs on the base implementation with kvbench's mask: by slot order when the
    layer holds the newest tokens, by each head's positions once a method chose them."""
    from kvbench.engine.attention import _base_function, _mask_for_base

    attn, query, key, value = make("window", q=q, kv=11)
    b, hkv, kv = 2, 2, 11
    if gapped:
        key_pos, end = gapped_positions(b, hkv, kv, q)
        positions = (key_pos, end)
    else:
        key_pos, end, positions = torch.arange(kv).expand(b, hkv, kv), kv, None
    mask = _mask_for_base(base, attn, query, key, positions)
    out, _ = _base_function(base)(FakeModule(base, groups=2), query, key, value, mask, scaling=attn.scaling)
    probs = loop_probs(query, key, attn, list(range(end - q, end)), key_pos.tolist())
    expected = torch.einsum("bhqk,bhkd->bqhd", probs, value.double().repeat_interleave(2, dim=1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
