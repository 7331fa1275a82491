"""CriticalKV as `method.critical` (arXiv:2502.03805; kvpress CriticalKVPress / CriticalAdaKVPress at commit
8bb29b9): kept sets at the prompt cut against (a) a brute-force reference with explicit loops (the method's
score, ||v W_o[g]||_1 summed element by element, both stages by sorting) and (b) kvpress's own code
transcribed in torch; MHA and GQA, dense and Ada-KV budgets, fp32."""

from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import Budget
from kvbench.errors import KVBenchError
from kvbench.methods import build
from tests.helpers import FakeModule, assert_batched_equals_alone, one_layer_cache, ragged_kept
from tests.unit.test_chunk import token_scores
from tests.unit.test_methods import random_inputs
from tests.unit.test_scorers import knorm_scores

HIDDEN = 12


class ProjectedModule(FakeModule):
    def __init__(self, groups, query_heads, seed):
        super().__init__("sdpa", groups=groups)
        g = torch.Generator().manual_seed(seed)
        self.o_proj = SimpleNamespace(weight=torch.randn(HIDDEN, query_heads * 8, generator=g)
                                      * torch.rand(1, query_heads * 8, generator=g))


def run_engine(cfg, budget, q, k, v, module):
    layer = one_layer_cache(cfg, budget, q, k, v, module).layers[0]
    if layer.ragged is None:
        return [[sorted(h) for h in row] for row in layer.view("pos").tolist()]
    return [[sorted(h) for h in row] for row in ragged_kept(layer)]


def output_norms(v, weight, b, hkv, hq):
    """w[h][j]: mean over KV head h's query heads g of sum_o |sum_d v[j][d] W[o][g D + d]|, by loops."""
    D = v.shape[-1]
    groups = hq // hkv
    W = weight.tolist()
    out = []
    for h in range(hkv):
        row = []
        for j in range(v.shape[2]):
            vj = v[b, h, j].tolist()
            total = 0.0
            for g in range(h * groups, (h + 1) * groups):
                total += sum(abs(sum(vj[d] * W[o][g * D + d] for d in range(D))) for o in range(HIDDEN))
            row.append(total / groups)
        out.append(row)
    return out


def top(values, count, first=()):
    """Indices of the `count` largest values, the `first` ones ranked above all, the larger index winning ties."""
    order = sorted(range(len(values)), key=lambda j: (j in first, values[j], j), reverse=True)
    return set(order[:count])


def critical_reference(scores, norms, budgets, ratio, eps, protected, safe=0):
    """Kept positions per head: stage 1 the top max(int(n_h ratio), safe) by score (protected first), then the
    top of the rest by (s + eps) w up to n_h (protected first)."""
    kept = []
    for h, s in enumerate(scores):
        stage1 = top(s, max(int(budgets[h] * ratio), safe), protected)
        weighted = [(s[j] + eps) * norms[h][j] for j in range(len(s))]
        rest = top(weighted, budgets[h], stage1 | set(protected))
        kept.append(sorted(rest))
    return kept


def ada_budgets(scores, budget, floor, protected):
    """Ada-KV's head budgets (kvpress AdaKVPress): each head's top int(floor C) safe, then the layer's H C
    largest scores over all heads, by loops."""
    heads, n = len(scores), len(scores[0])
    ranked = []
    for h in range(heads):
        safe = top(scores[h], int(budget * floor), protected)
        for j in range(n):
            ranked.append((j in safe or j in protected, scores[h][j], h, j))
    chosen = sorted(ranked, reverse=True)[: heads * budget]
    return [sum(1 for c in chosen if c[2] == h) for h in range(heads)]


CASES = [  # method settings (critical added), budget
    ({"name": "knorm"}, 16),
    ({"name": "knorm", "sinks": 3}, 13),
    ({"name": "snapkv", "window": 6, "kernel": 7}, 16),
    ({"name": "tova", "stage": "prefill"}, 11),
    ({"name": "knorm", "heads": "ada"}, 14),
    ({"name": "h2o", "stage": "prefill", "heads": "ada", "recent_fraction": 0.0}, 12),
]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.0, 1.0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c[0].values()) + f"-{c[1]}")
def test_kept_sets_match_brute_force(case, ratio, hkv):
    cfg, budget = case
    n = 40
    q, k, v, _ = random_inputs(hkv, n, steps=0, seed=budget + hkv)
    module = ProjectedModule(4 // hkv, 4, seed=hkv)
    method = build(cfg)
    _, sinks, recent = method.allocate(Budget(tokens=budget), n)
    protected = [j for j in range(n) if j < sinks or j >= n - recent]
    expected = []
    for b in range(2):
        scores = token_scores(cfg, q, k, v, b)
        norms = output_norms(v, module.o_proj.weight, b, hkv, 4)
        if cfg.get("heads") == "ada":
            budgets, safe = ada_budgets(scores, budget, 0.2, protected), int(budget * 0.2)
        else:
            budgets, safe = [budget] * hkv, 0
        expected.append(critical_reference(scores, norms, budgets, ratio, 1e-4, protected, safe))
    assert run_engine({**cfg, "critical": True, "critical_ratio": ratio}, budget, q, k, v, module) == expected


def kvpress_critical_keep(scores, values, weight, n_kept, ratio=0.5, eps=1e-4, query_heads=4):
    """kvpress CriticalKVPress.score (vwl1norm inlined) then ScorerPress's top-n_kept, transcribed."""
    bsz, hkv, k_len, head_dim = values.shape
    groups = query_heads // hkv
    Wo = weight.transpose(0, 1).view(query_heads, head_dim, HIDDEN)
    V = values.repeat_interleave(groups, dim=1)
    norms = torch.stack([torch.norm(V[:, h].matmul(Wo[h].unsqueeze(0)), p=1, dim=-1) for h in range(query_heads)], 1)
    norms = norms.view(bsz, hkv, groups, k_len).mean(dim=2)
    top_k_index = torch.topk(scores, int(n_kept * ratio), sorted=True, dim=-1).indices
    scores = (scores + eps) * norms
    scores.scatter_(-1, top_k_index, torch.finfo(scores.dtype).max)
    return scores.topk(n_kept, dim=-1).indices


def kvpress_critical_ada_keep(scores, values, weight, n_kept, alpha=0.2, ratio=0.5, eps=1e-4, query_heads=4):
    """kvpress CriticalAdaKVPress.compress, transcribed: the kept (batch, head, position) triples."""
    bsz, hkv, k_len = scores.shape
    n_safe = int(n_kept * alpha)
    top_indices = torch.topk(scores, n_safe, dim=-1).indices
    scores.scatter_(-1, top_indices, torch.finfo(scores.dtype).max)
    budget_scores = scores.scatter(-1, top_indices, torch.finfo(scores.dtype).max).reshape(bsz, -1)
    top_indices = torch.topk(budget_scores, n_kept * hkv, dim=-1).indices
    head_budgets = torch.zeros(hkv, dtype=torch.int64)
    head_budgets.scatter_add_(0, (top_indices // k_len).flatten(), torch.ones_like(top_indices.flatten()))
    first = (head_budgets * ratio).to(torch.int64).tolist()
    top_k_index = torch.topk(scores, max(first), sorted=True, dim=-1).indices
    for h in range(hkv):
        scores[:, h, :].scatter_(-1, top_k_index[:, h, : first[h]], torch.finfo(scores.dtype).max)
    groups = query_heads // hkv
    Wo = weight.transpose(0, 1).view(query_heads, values.shape[-1], HIDDEN)
    V = values.repeat_interleave(groups, dim=1)
    norms = torch.stack([torch.norm(V[:, h].matmul(Wo[h].unsqueeze(0)), p=1, dim=-1) for h in range(query_heads)], 1)
    scores = (scores + eps) * norms.view(bsz, hkv, groups, k_len).mean(dim=2)
    top_k_index = torch.topk(scores, int(max(head_budgets)), sorted=True, dim=-1).indices
    for h in range(hkv):
        scores[:, h, :].scatter_(-1, top_k_index[:, h, : head_budgets[h]], torch.finfo(scores.dtype).max)
    n_pruned = hkv * (k_len - n_kept)
    pruned = set(torch.topk(-scores.reshape(bsz, -1), n_pruned, dim=1).indices.flatten().tolist())
    return [[[j for j in range(k_len) if h * k_len + j not in pruned] for h in range(hkv)]]


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knorm_matches_kvpress_code(hkv, seed):
    """Knorm scores (KnormPress: -||k||) through kvpress's CriticalKV and CriticalAdaKV code: the same sets
    (one sequence: kvpress's Ada-KV code sums head budgets over the batch)."""
    q, k, v, _ = random_inputs(hkv, 40, steps=0, seed=seed)
    q, k, v = q[:1], k[:1], v[:1]
    module = ProjectedModule(4 // hkv, 4, seed=seed)
    scores = -k.norm(dim=-1)
    dense = kvpress_critical_keep(scores.clone(), v, module.o_proj.weight, 16)
    expected = [[sorted(dense[0, h].tolist()) for h in range(hkv)]]
    assert run_engine({"name": "knorm", "critical": True}, 16, q, k, v, module) == expected
    ada = kvpress_critical_ada_keep(scores.clone(), v, module.o_proj.weight, 16)
    assert run_engine({"name": "knorm", "heads": "ada", "critical": True}, 16, q, k, v, module) == ada


def test_budget_above_the_prompt_keeps_everything_and_ratio_one_is_the_method():
    q, k, v, _ = random_inputs(2, 30, steps=0, seed=4)
    module = ProjectedModule(2, 4, seed=4)
    for cfg in ({"name": "knorm"}, {"name": "snapkv", "window": 6}, {"name": "knorm", "heads": "ada"}):
        for budget in (30, 64):
            assert run_engine({**cfg, "critical": True}, budget, q, k, v, module) == [[list(range(30))] * 2] * 2
    plain = run_engine({"name": "knorm"}, 12, q, k, v, module)
    assert run_engine({"name": "knorm", "critical": True, "critical_ratio": 1.0}, 12, q, k, v, module) == plain
    assert run_engine({"name": "knorm", "critical": True}, 12, q, k, v, module) != plain


def test_knorm_reference_scores_are_key_norms():
    q, k, v, _ = random_inputs(2, 10, steps=0, seed=1)
    assert torch.allclose(torch.tensor(knorm_scores(k[0, 1].tolist())), -k[0, 1].norm(dim=-1))


def test_labels_and_settings():
    assert build({"name": "snapkv", "critical": True}).run_label == "snapkv-critical"
    assert build({"name": "knorm", "heads": "ada", "critical": True}).run_label == "knorm-ada-critical"
    for cfg, message in (({"name": "streamingllm"}, "method.critical=false"),
                         ({"name": "duo_attention", "patterns": "tests/fixtures/duo_attention/tiny"}, "method.critical=false"),
                         ({"name": "h2o"}, "method.stage=prefill"),
                         ({"name": "snapkv", "gqa": "expand"}, "method.gqa=kv"),
                         ({"name": "knorm", "chunk": 4}, "set one of them"),
                         ({"name": "knorm", "critical_ratio": 1.5}, r"in \[0, 1\]")):
        with pytest.raises(KVBenchError, match=message):
            build({**cfg, "critical": True})


def test_a_module_without_output_projection_is_one_line():
    q, k, v, _ = random_inputs(2, 20, steps=0, seed=1)
    with pytest.raises(KVBenchError, match="no o_proj weight"):
        run_engine({"name": "knorm", "critical": True}, 8, q, k, v, FakeModule("sdpa", groups=2))


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # GQA; sliding + full layers
def test_critical_runs_batched_equal_alone_on_tiny_models(family):
    """A model end to end (its own o_proj): batch 4 gives batch 1's tokens, the budget is kept, and the
    re-ranking changes what is kept."""
    from kvbench.engine import Session, install
    from kvbench.models.families import tiny_model

    model = tiny_model(family, num_hidden_layers=2)
    install(model, "sdpa")
    for settings in ({"name": "knorm", "critical": True}, {"name": "snapkv", "window": 4, "critical": True},
                     {"name": "knorm", "heads": "ada", "critical": True}):
        assert_batched_equals_alone(model, settings, 16, seed=3)
    ids = torch.randint(0, 128, (1, 57), generator=torch.Generator().manual_seed(3))
    sessions = [Session(model, build(s), Budget(tokens=16), reserve=6)
                for s in ({"name": "knorm", "critical": True}, {"name": "knorm"})]
    for session in sessions:
        session.prefill(ids)
    summaries = [s.cache.kv_summary() for s in sessions]
    assert summaries[0]["kv_kept_per_layer_head"] == summaries[1]["kv_kept_per_layer_head"]
    kept = [[layer.view("pos").sort(dim=-1).values for layer in s.cache.layers if not layer.window] for s in sessions]
    assert any(not torch.equal(a, b) for a, b in zip(*kept))
