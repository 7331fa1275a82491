"""ChunkKV as `method.chunk=N` (arXiv:2502.00299; kvpress ChunkKVPress at commit 8bb29b9): kept sets at the
prompt cut against a brute-force reference with explicit loops over chunks, on the method's scores
computed by loops too (naive attention for SnapKV, H2O and TOVA; key norms for Knorm); MHA and GQA, fp32.

The rule the reference states: chunks of N consecutive positions from position 0, the last one partial; a
chunk's score is the sum over KV heads and over its tokens of the token scores, divided by its token count;
the protected tokens first, then the chunks holding a protected token, then the other chunks by score
(the newer among equals, and inside a chunk the newer token): the same tokens in every head."""

from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import Budget, CompressedCache
from kvbench.engine.attention import kvbench_attention
from kvbench.engine.selection import chunk_rank
from kvbench.errors import KVBenchError
from kvbench.methods import build
from tests.helpers import SCALING, FakeModule
from tests.unit.test_methods import Reference, engine_kept, random_inputs
from tests.unit.test_scorers import knorm_scores


def token_scores(cfg, q, k, v, b):
    """Per KV head, the method's score of every prompt token of batch row b (no cut), by loops."""
    n, hkv = k.shape[2], k.shape[1]
    if cfg["name"] == "knorm":
        return [knorm_scores(k[b, h].tolist()) for h in range(hkv)]
    opts = {"window": cfg["window"], "kernel": cfg["kernel"]} if cfg["name"] == "snapkv" else {}
    ref = Reference(cfg["name"], q, k, v, n + 1, 0, 0, **opts)  # budget above the prompt: scores only
    return [[t["s"] for t in ref.heads[b, h]] for h in range(hkv)]


def chunk_reference(scores, chunk, budget, sinks, recent):
    """Kept positions (the same in every head) for one batch row: explicit loops over the chunks."""
    heads, n = len(scores), len(scores[0])
    if n <= budget:
        return [list(range(n))] * heads
    protected = [j < sinks or j >= n - recent for j in range(n)]
    if n < chunk:  # no complete chunk: the plain per-head cut (kvpress delegates to the wrapped press)
        kept = []
        for h in range(heads):
            order = sorted(range(n), key=lambda j: (protected[j], scores[h][j], j), reverse=True)
            kept.append(sorted(order[:budget]))
        return kept
    key = {}
    for start in range(0, n, chunk):
        members = range(start, min(start + chunk, n))
        total = 0.0
        for h in range(heads):
            for j in members:
                total += scores[h][j]
        held = any(protected[j] for j in members)
        for j in members:
            key[j] = (protected[j], held, total / len(members), j)
    order = sorted(range(n), key=lambda j: key[j], reverse=True)
    return [sorted(order[:budget])] * heads


def run_engine(cfg, budget, q, k, v):
    cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1)), build(cfg),
                            Budget(tokens=budget))
    keys, values = cache.update(k, v, 0)
    kvbench_attention(FakeModule("sdpa", groups=q.shape[1] // k.shape[1]), q, keys, values, None,
                      scaling=SCALING, kvbench_cache=cache)
    return engine_kept(cache)


CASES = [  # method settings (chunk added), budget
    ({"name": "knorm"}, 16),
    ({"name": "knorm", "sinks": 3}, 16),
    ({"name": "snapkv", "window": 6, "kernel": 7}, 16),
    ({"name": "snapkv", "window": 4, "kernel": 3}, 12),
    ({"name": "h2o", "stage": "prefill"}, 16),
    ({"name": "tova", "stage": "prefill"}, 13),
]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("chunk", [5, 7, 8, 40])  # 8 whole chunks; 5 whole + 1 partial; budget a multiple; no chunk
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c[0].values()) + f"-{c[1]}")
def test_kept_sets_match_brute_force_chunks(case, chunk, hkv):
    cfg, budget = case
    n = 40 if chunk != 40 else 33  # chunk 40 > prompt 33: kvpress's fallback, the plain cut
    q, k, v, _ = random_inputs(hkv, n, steps=0, seed=chunk + hkv + budget)
    _, sinks, recent = build(cfg).allocate(Budget(tokens=budget), n)
    expected = [chunk_reference(token_scores(cfg, q, k, v, b), chunk, budget, sinks, recent) for b in range(2)]
    assert run_engine({**cfg, "chunk": chunk}, budget, q, k, v) == expected


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_chunks_are_whole_and_shared_by_every_head(hkv):
    q, k, v, _ = random_inputs(hkv, 40, steps=0, seed=3)
    kept = run_engine({"name": "knorm", "chunk": 5}, 20, q, k, v)
    for row in kept:
        assert all(heads == row[0] for heads in row)
        assert len({p // 5 for p in row[0]}) == 4  # 20 tokens: exactly 4 whole chunks
        assert kept != run_engine({"name": "knorm"}, 20, q, k, v)


@pytest.mark.parametrize("cfg", [{"name": "knorm"}, {"name": "snapkv", "window": 6, "kernel": 7}, {"name": "tova", "stage": "prefill"}])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_budget_above_the_prompt_keeps_everything(cfg, hkv):
    q, k, v, _ = random_inputs(hkv, 30, steps=0, seed=11)
    for budget in (30, 64):
        assert run_engine({**cfg, "chunk": 7}, budget, q, k, v) == [[list(range(30))] * hkv] * 2


@pytest.mark.parametrize(("cfg", "hkv"), [({"name": "tova", "stage": "prefill"}, 4), ({"name": "tova", "stage": "prefill"}, 2), ({"name": "knorm"}, 1),
                                          ({"name": "snapkv", "window": 6, "kernel": 7}, 1),
                                          ({"name": "h2o", "stage": "prefill"}, 1)])
def test_chunk_one_is_the_plain_method(cfg, hkv):
    """Chunks of one token rank by the head-summed score: the plain method's cut wherever the heads share
    one score (TOVA) or there is one KV head."""
    q, k, v, _ = random_inputs(hkv, 40, steps=0, seed=5)
    for budget in (9, 16):
        assert run_engine({**cfg, "chunk": 1}, budget, q, k, v) == run_engine(cfg, budget, q, k, v)


def kvpress_chunk_scores(global_scores, chunk_length):
    """kvpress ChunkKVPress.compress, steps 1-2, copied: the chunk scores (batch, chunks)."""
    kv_len = global_scores.shape[-1]
    num_complete_chunks = kv_len // chunk_length
    remaining_tokens = kv_len % chunk_length
    main_scores = global_scores[..., : num_complete_chunks * chunk_length]
    main_chunk_scores = main_scores.sum(dim=1).view(-1, num_complete_chunks, chunk_length).mean(dim=-1)
    if remaining_tokens > 0:
        remaining_chunk_score = global_scores[..., -remaining_tokens:].sum(dim=1).mean(dim=-1, keepdim=True)
        return torch.cat([main_chunk_scores, remaining_chunk_score], dim=-1)
    return main_chunk_scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [40, 43])
def test_chunk_scores_are_kvpress_s_in_the_scores_dtype(dtype, n):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(2, 3, n, generator=g).to(dtype)
    pos = torch.arange(n).expand(2, 3, n)
    ranked = chunk_rank(scores, pos, 8, torch.zeros(2, 3, n, dtype=torch.bool))
    expected = kvpress_chunk_scores(scores, 8).float()
    per_token = expected.repeat_interleave(8, dim=-1)[..., :n]
    torch.testing.assert_close(ranked, per_token[:, None].expand(2, 3, n), rtol=0, atol=0)


def test_whole_chunk_budget_keeps_kvpress_s_chunks():
    """Budget and prompt multiples of the chunk: kvpress keeps int(chunks x (1 - c)) = C / N whole chunks,
    the top ones by its chunk scores: the same tokens."""
    q, k, v, _ = random_inputs(2, 40, steps=0, seed=9)
    scores = -k.norm(dim=-1)  # KnormPress.score
    top = kvpress_chunk_scores(scores, 8).topk(2, dim=-1).indices
    expected = [[sorted(p for c in top[b].tolist() for p in range(8 * c, 8 * c + 8))] * 2 for b in range(2)]
    assert run_engine({"name": "knorm", "chunk": 8}, 16, q, k, v) == expected


def test_labels_and_settings():
    assert build({"name": "knorm", "chunk": 10}).run_label == "knorm-chunk10"
    assert build({"name": "snapkv", "chunk": 10, "query": "agnostic"}).run_label == "snapkv-chunk10-agnostic"
    assert build({"name": "knorm"}).run_label == "knorm"
    with pytest.raises(KVBenchError, match="method.stage=prefill"):
        build({"name": "h2o", "chunk": 10})  # h2o's default stage is decode
    with pytest.raises(KVBenchError, match="method.stage=prefill"):
        build({"name": "knorm", "stage": "decode", "chunk": 10})
    with pytest.raises(KVBenchError, match="method.heads=equal"):
        build({"name": "knorm", "heads": "ada", "chunk": 10})
    with pytest.raises(KVBenchError, match="method.gqa=kv"):
        build({"name": "snapkv", "gqa": "expand", "chunk": 10})
    with pytest.raises(KVBenchError, match="must be >= 0"):
        build({"name": "knorm", "chunk": -1})
    for name in ("full", "streamingllm", "pyramidkv", "ada_snapkv", "weightedkv"):
        with pytest.raises(KVBenchError, match="method.chunk=0"):
            build({"name": name, "stage": "prefill", "chunk": 10})


@pytest.mark.parametrize("family", ["gemma2"])  # GQA, sliding + full layers
def test_chunked_runs_batched_equal_alone_on_tiny_models(family):
    """A model end to end, sliding-window layers included: batch 4 gives batch 1's tokens, and the chunk
    setting changes what is kept."""
    from kvbench.engine import Session, install
    from kvbench.engine.batch import Request, decode_together
    from kvbench.models.families import tiny_model

    model = tiny_model(family, num_hidden_layers=2)
    install(model, "sdpa")
    g = torch.Generator().manual_seed(2)
    requests = [Request(torch.randint(0, 128, (1, n), generator=g), 8, []) for n in (40, 23, 57, 31)]
    for settings in ({"name": "knorm", "chunk": 5}, {"name": "snapkv", "window": 4, "chunk": 6}):
        together = dict(decode_together(model, requests, build(settings), Budget(tokens=16), 4))
        for i, request in enumerate(requests):
            session = Session(model, build(settings), Budget(tokens=16), reserve=8)
            assert together[i].tokens == session.generate(request.input_ids, 8, []).tokens[0]
        chunked, plain = (Session(model, build(s), Budget(tokens=16), reserve=8) for s in (settings, {**settings, "chunk": 0}))
        for session in (chunked, plain):
            session.prefill(requests[2].input_ids)
        count = lambda session: session.cache.kv_summary()["kv_kept_per_layer_head"]  # noqa: E731
        assert count(chunked) == count(plain)  # the same budget (a sliding layer: its window)
        full = [layer.view("pos") for layer in chunked.cache.layers if not layer.window]
        assert full and all(pos.shape[-1] == 16 and (pos == pos[:, :1]).all() for pos in full)  # shared by heads
