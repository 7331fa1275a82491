"""Engine edge cases (issue 13, item 9): the window statistic's memory, buffer capacity when a prompt
fits its budget, and one tie rule (the newer token wins) at the prompt cut and at every decode eviction."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvbench.engine import Budget, CompressedCache, forward
from kvbench.engine.attention import MIN_BLOCK_ELEMENTS, attention_window, kvbench_attention
from kvbench.methods import build
from tests.helpers import FakeModule


class LargestOutput(TorchDispatchMode):
    """The most elements any single aten op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_window_statistic_at_16k_is_computed_in_query_blocks():
    """A 400-query window on 8 query heads at 16k keys: never the (8, 400, 16384) float32 tensor
    (52M elements, 210 MB; 839 MB with a 7B model's 32 heads), only blocks of at most
    MIN_BLOCK_ELEMENTS logits (head_dim kept small so the test is fast)."""
    g = torch.Generator().manual_seed(0)
    n, window = 16384, 400
    query = torch.randn(1, 8, n, 4, generator=g)
    key = torch.randn(1, 2, n, 4, generator=g)
    with LargestOutput() as counter:
        stats = attention_window(query, key, window)
    assert counter.largest <= MIN_BLOCK_ELEMENTS and 12 * MIN_BLOCK_ELEMENTS <= 8 * window * n
    # the last query's attention on the last key, written out, matches its share of the mean
    last = torch.softmax((query[0, 0:4, -1] @ key[0, 0].T) * 0.5, dim=-1)  # group 0: query heads 0-3
    assert stats.shape == (1, 2, n) and torch.isfinite(stats).all()
    assert float(stats[0, 0, -1]) == pytest.approx(float(last[:, -1].mean()) / window, rel=1e-4)


def one_layer(method, budget, reserve=0):
    config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return CompressedCache(SimpleNamespace(config=config), build(method), Budget(tokens=budget), reserve=reserve)


@pytest.mark.parametrize("method,reserve,capacity", [
    ({"name": "h2o"}, 0, 33),  # decode stage: never more than budget + 1
    ({"name": "h2o"}, 5, 25),  # ... or prompt + new tokens when that is less
    ({"name": "streamingllm", "stage": "decode"}, 0, 33),
    ({"name": "snapkv"}, 5, 25),  # prefill stage: prompt + new tokens
    ({"name": "h2o"}, 200, 33),
])
def test_a_prompt_that_fits_its_budget_is_not_copied_at_the_first_decoded_token(method, reserve, capacity):
    cache = one_layer(method, budget=32, reserve=reserve)
    g = torch.Generator().manual_seed(1)
    module = FakeModule("sdpa", groups=2)
    k = torch.randn(1, 2, 20, 8, generator=g)
    keys, values = cache.update(k, torch.randn_like(k), 0)
    kvbench_attention(module, torch.randn(1, 4, 20, 8, generator=g), keys, values, None, kvbench_cache=cache)
    layer = cache.layers[0]
    assert layer.capacity == capacity
    buffer = layer.keys.data_ptr()
    cache.phase = "decode"
    for _ in range(min(reserve, 5) or 5):
        k1 = torch.randn(1, 2, 1, 8, generator=g)
        keys, values = cache.update(k1, torch.randn_like(k1), 0)
        kvbench_attention(module, torch.randn(1, 4, 1, 8, generator=g), keys, values, None, kvbench_cache=cache)
    assert layer.keys.data_ptr() == buffer and layer.capacity == capacity


def test_equal_scores_evict_the_oldest_token_at_every_decode_step():
    """TOVA with zero queries: every token gets the same attention, so each eviction must drop the
    oldest token (the newer wins), although evictions have long reordered the slots."""
    budget, n, steps = 8, 20, 30
    cache = one_layer({"name": "tova"}, budget=budget)
    module = FakeModule("sdpa", groups=2)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 2, n, 8, generator=g)
    keys, values = cache.update(k, torch.randn_like(k), 0)
    kvbench_attention(module, torch.zeros(2, 4, n, 8), keys, values, None, kvbench_cache=cache)
    layer = cache.layers[0]
    assert sorted(layer.view("pos")[0, 0].tolist()) == list(range(n - budget, n))  # prompt cut: newest win
    cache.phase = "decode"
    slot_orders = set()
    for step in range(steps):
        k1 = torch.randn(2, 2, 1, 8, generator=g)
        keys, values = cache.update(k1, torch.randn_like(k1), 0)
        kvbench_attention(module, torch.zeros(2, 4, 1, 8), keys, values, None, kvbench_cache=cache)
        seen = n + step + 1
        for b in range(2):
            for h in range(2):
                assert sorted(layer.view("pos")[b, h].tolist()) == list(range(seen - budget, seen)), step
        slot_orders.add(tuple(layer.view("pos")[0, 0].argsort().tolist()))
    assert len(slot_orders) > 1  # the slots were not in position order all along


def test_equal_scores_in_a_model_keep_the_newest_tokens(tiny_gqa):
    """The same rule through a real model: H2O's heavy part with every score equal to zero keeps the newest."""
    model, _ = tiny_gqa
    method = build({"name": "h2o"})
    method.decode_update = lambda layer, stats: None  # scores stay 0: every eviction is a tie
    method.prefill_scores = lambda layer, stats: None
    cache = CompressedCache(model, method, Budget(tokens=16), reserve=10)
    with torch.inference_mode():
        logits = forward(model, cache, torch.randint(4, 200, (1, 30), generator=torch.Generator().manual_seed(3)))
        cache.phase = "decode"
        for _ in range(10):
            logits = forward(model, cache, logits[:, -1].argmax(-1)[:, None])
    for layer in cache.layers:
        assert sorted(layer.view("pos")[0, 0].tolist()) == list(range(40 - 16, 40))


@pytest.mark.parametrize("sinks", [0, 4])
def test_recency_eviction_from_the_ring_keeps_sinks_and_the_newest(sinks):
    """StreamingLLM finds its victim from the slot layout (a ring, no search of the positions) while one
    token comes per step; a step of several tokens falls back to the search, and every kept set is right."""
    budget, n = 12, 30
    cache = one_layer({"name": "streamingllm", "stage": "decode", "sinks": sinks}, budget=budget)
    module = FakeModule("sdpa", groups=2)
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, n, 8, generator=g)
    keys, values = cache.update(k, k.clone(), 0)
    kvbench_attention(module, torch.randn(2, 4, n, 8, generator=g), keys, values, None, kvbench_cache=cache)
    cache.phase = "decode"
    layer, seen = cache.layers[0], n
    written = {j: k[:, :, j] for j in range(n)}
    for q in [1] * 25 + [3] + [1] * 5:
        k1 = torch.randn(2, 2, q, 8, generator=g)
        written.update({seen + i: k1[:, :, i] for i in range(q)})
        keys, values = cache.update(k1, k1.clone(), 0)
        kvbench_attention(module, torch.randn(2, 4, q, 8, generator=g), keys, values, None, kvbench_cache=cache)
        seen += q
        expected = list(range(sinks)) + list(range(seen - budget + sinks, seen))
        pos = layer.view("pos")
        for b in range(2):
            for h in range(2):
                assert sorted(pos[b, h].tolist()) == expected, (q, seen)
                for slot, p in enumerate(pos[b, h].tolist()):  # keys and values moved with their positions
                    assert torch.equal(layer.keys[b, h, slot], written[p][b, h])
                    assert torch.equal(layer.values[b, h, slot], written[p][b, h])
        if seen < n + 25:
            assert layer.ring_end is not None  # one token a step: the victim came from the ring
    assert layer.ring_end is None  # after the 3-token step: searched
