"""`method.quant=kivi2|kivi4`: KIVI's quantized KV in the engine, alone (a full cache) and after a prompt-stage
method's cut. What the attention reads after the prompt equals the loops' quantization (tests/unit/
test_quantized.py's references) of exactly the tokens the same method keeps unquantized; the newest tokens stay
exact; meta's bytes are the store's; sliding layers keep their window; batched equals alone."""

import pytest
import torch

from kvbench.engine import Budget, Session, install
from kvbench.engine.types import RepeatPrompts
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.models.families import tiny_model
from tests.helpers import assert_batched_equals_alone
from tests.unit.test_quantized import ref_keys, ref_values

SETTINGS = {"quant_group": 8, "quant_residual": 16}


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", num_hidden_layers=2)
    install(model, "sdpa")
    return model


def prompt(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("cfg", [{"name": "full"}, {"name": "snapkv", "window": 4}, {"name": "knorm"},
                                 {"name": "expected_attention"}], ids=lambda c: c["name"])
def test_the_store_holds_the_loops_quantization_of_the_kept_tokens(llama, cfg, bits):
    ids = prompt(53)
    plain = Session(llama, build(cfg), Budget(tokens=40))
    plain.prefill(ids)
    quant = Session(llama, build({**cfg, "quant": f"kivi{bits}", **SETTINGS}), Budget(tokens=40))
    quant.prefill(ids)
    for dense, layer in zip(plain.cache.layers, quant.cache.layers):
        keys, values = dense.view("keys"), dense.view("values")  # the kept tokens, in position order
        n = keys.shape[2]
        m = ((n - 16) // 8 + 1) * 8  # whole groups leave fewer than 16 in the residual
        assert layer.store.quantized_length == m and layer.store.length == n
        torch.testing.assert_close(layer.store.keys()[:, :, :m], ref_keys(keys[:, :, :m], bits, 8)[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.store.values()[:, :, :m], ref_values(values[:, :, :m], bits, 8)[1],
                                   rtol=0, atol=1e-6)
        assert torch.equal(layer.store.keys()[:, :, m:], keys[:, :, m:])  # the residual: exact
    summary = quant.cache.kv_summary()
    assert summary["kv_kept_bytes"] == sum(layer.store.nbytes for layer in quant.cache.layers)
    assert summary["kv_kept_tokens"] == plain.cache.kv_summary()["kv_kept_tokens"]
    assert summary["kv_kept_bytes"] < plain.cache.kv_summary()["kv_kept_bytes"]


def test_a_residual_above_everything_is_the_unquantized_run(llama):
    ids = prompt(30, seed=1)
    for cfg in ({"name": "full"}, {"name": "knorm"}):
        plain = Session(llama, build(cfg), Budget(tokens=20), reserve=8).generate(ids, 8, []).tokens
        quant = Session(llama, build({**cfg, "quant": "kivi2", "quant_group": 8, "quant_residual": 64}),
                        Budget(tokens=20), reserve=8).generate(ids, 8, []).tokens
        assert quant == plain


def test_decoding_appends_and_flushes_whole_groups(llama):
    session = Session(llama, build({"name": "full", "quant": "kivi4", **SETTINGS}), reserve=20)
    session.generate(prompt(21, seed=2), 20, [])
    layer = session.cache.layers[0]
    assert layer.store.length == 21 + 19 and layer.seen == 40
    assert layer.store.quantized_length % 8 == 0 and 8 <= layer.store.residual_length < 16


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batched_equals_alone_and_sliding_layers_keep_their_window(family):
    model = tiny_model(family, num_hidden_layers=2)
    install(model, "sdpa")
    settings = {"name": "snapkv", "window": 4, "quant": "kivi2", **SETTINGS}
    assert_batched_equals_alone(model, settings, 24, seed=4)
    session = Session(model, build(settings), Budget(tokens=24), reserve=6)
    session.generate(torch.randint(0, 128, (1, 57), generator=torch.Generator().manual_seed(4)), 6, [])
    for layer in session.cache.layers:
        assert (layer.store is None) == bool(layer.window)


def test_settings():
    assert build({"name": "snapkv", "quant": "kivi2"}).run_label == "snapkv-kivi2"
    assert build({"name": "full", "quant": "kivi4"}).run_label == "full-kivi4"
    for cfg, message in (({"name": "weightedkv", "stage": "decode"}, "merges values"),
                         ({"name": "streamingllm", "positions": "shifted", "stage": "prefill"}, "positions=original"),
                         ({"name": "full", "quant": "kivi3"}, "is not one of"),
                         ({"name": "full", "quant_residual": 20}, "multiple")):
        with pytest.raises(KVBenchError, match=message):
            build({"quant": "kivi2", **cfg})


def test_a_group_that_does_not_divide_the_head_dim_is_one_line(llama):
    session = Session(llama, build({"name": "full", "quant": "kivi2"}), reserve=2)  # group 32, head dim 16
    with pytest.raises(KVBenchError, match="method.quant_group=32 must divide the model's head dim 16"):
        session.prefill(prompt(20))


DECODE = [{"name": "h2o"}, {"name": "tova"}, {"name": "knorm", "stage": "decode"}, {"name": "vatp"},
          {"name": "keydiff", "stage": "decode"}, {"name": "streamingllm", "positions": "original", "stage": "decode"}]


@pytest.mark.parametrize("cfg", DECODE, ids=lambda c: c["name"])
def test_decode_stage_eviction_from_an_unquantized_store_is_the_plain_method(llama, cfg):
    """A residual above every token quantizes nothing: evicting from the store while decoding keeps exactly the
    plain method's tokens (its states follow the store's order)."""
    ids = prompt(40, seed=5)
    plain = Session(llama, build(cfg), Budget(tokens=16), reserve=12)
    quant = Session(llama, build({**cfg, "quant": "kivi2", "quant_group": 8, "quant_residual": 64}),
                    Budget(tokens=16), reserve=12)
    assert quant.generate(ids, 12, []).tokens == plain.generate(ids, 12, []).tokens
    for dense, layer in zip(plain.cache.layers, quant.cache.layers):
        assert layer.store is not None and layer.length == layer.store.length == 16
        assert torch.equal(layer.view("pos").sort(-1).values, dense.view("pos").sort(-1).values)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("cfg", DECODE[:3], ids=lambda c: c["name"])
@torch.inference_mode()
def test_decode_stage_eviction_from_a_quantized_store(llama, cfg, bits):
    """Quantized groups and a residual: the layer holds its budget at every step, and each slot's dequantized key
    is its position's true key within the quantization step (the states and the store stay aligned)."""
    ids = prompt(45, seed=6)
    session = Session(llama, build({**cfg, "quant": f"kivi{bits}", **SETTINGS}), Budget(tokens=24), reserve=14)
    tokens = session.generate(ids, 14, []).tokens[0]
    truth = Session(llama, build({"name": "full"}), reserve=14)
    truth.prefill(ids)
    for token in tokens[:-1]:
        truth.step(torch.tensor([[token]]))
    for layer, full in zip(session.cache.layers, truth.cache.layers):
        store = layer.store
        assert layer.length == store.length == 24 and store.quantized_length >= 8
        pos = layer.view("pos")
        true_keys = full.view("keys").gather(2, pos[..., None].expand(-1, -1, -1, full.view("keys").shape[-1]))
        spread = full.view("keys").amax(2, keepdim=True) - full.view("keys").amin(2, keepdim=True)
        # layer 0's keys depend on the tokens alone; a later layer's decoded keys on the quantized layers below.
        # Within two half steps: a head that kept fewer residual tokens took some back dequantized, and they are
        # quantized again when the residual next fills (QuantizedKV.keep)
        same_input = pos < ids.shape[1] if layer.layer_idx else torch.ones_like(pos, dtype=torch.bool)
        error = (store.keys() - true_keys).abs()[same_input]
        assert (error <= (spread / (2**bits - 1)).expand_as(true_keys)[same_input] + 1e-5).all()
    summary = session.cache.kv_summary()
    assert summary["kv_kept_bytes"] == sum(layer.store.nbytes for layer in session.cache.layers)


def test_decode_stage_kivi_batched_equals_alone(llama):
    assert_batched_equals_alone(llama, {"name": "h2o", "quant": "kivi2", **SETTINGS}, 20, seed=7)


PER_HEAD = [{"name": "knorm", "heads": "ada"}, {"name": "ada_snapkv"}, {"name": "pyramidkv"},
            {"name": "ada_snapkv", "gqa": "expand"}, {"name": "kvzip", "chunk_size": 16}]
REPEAT = RepeatPrompts(2, torch.tensor([7, 8, 9]), torch.tensor([10, 11]), torch.tensor([12]))


@pytest.mark.parametrize("cfg", PER_HEAD, ids=lambda c: "-".join(map(str, c.values())))
@torch.inference_mode()
def test_per_head_budgets_hold_each_segment_as_a_quantized_kv(llama, cfg):
    """Per-head budgets (a ragged store): each head's segment is quantized as a QuantizedKV of its own (its first
    m tokens in groups, the rest in full precision), checked against the loops; a residual above every token
    gives the plain method's tokens; the bytes are the store's."""
    ids = prompt(60, seed=3)
    plain = Session(llama, build(cfg), Budget(tokens=20), reserve=8, repeat=REPEAT)
    tokens = plain.generate(ids, 8, []).tokens
    whole = Session(llama, build({**cfg, "quant": "kivi2", "quant_group": 8, "quant_residual": 512}),
                    Budget(tokens=20), reserve=8, repeat=REPEAT)
    assert whole.generate(ids, 8, []).tokens == tokens
    for bits in (2, 4):
        quant = Session(llama, build({**cfg, "quant": f"kivi{bits}", **SETTINGS}), Budget(tokens=20), repeat=REPEAT)
        quant.prefill(ids)
        fresh = Session(llama, build(cfg), Budget(tokens=20), repeat=REPEAT)
        fresh.prefill(ids)
        for dense, layer in zip(fresh.cache.layers, quant.cache.layers):
            keys, values = layer.ragged.prefix()
            starts = dense.ragged.cu_lens.tolist()
            for s in range(len(starts) - 1):
                k = dense.ragged.prefix_keys[starts[s] : starts[s + 1]]
                v = dense.ragged.prefix_values[starts[s] : starts[s + 1]]
                n = k.shape[0]
                m = ((n - 16) // 8 + 1) * 8 if n >= 16 else 0
                got_k, got_v = keys[starts[s] : starts[s + 1]], values[starts[s] : starts[s + 1]]
                torch.testing.assert_close(got_k[:m], ref_keys(k[None, None, :m], bits, 8)[1][0, 0], rtol=0, atol=1e-6)
                torch.testing.assert_close(got_v[:m], ref_values(v[None, None, :m], bits, 8)[1][0, 0], rtol=0,
                                           atol=1e-6)
                assert torch.equal(got_k[m:], k[m:]) and torch.equal(got_v[m:], v[m:])
        summary = quant.cache.kv_summary()
        assert summary["kv_kept_bytes"] == sum(layer.ragged.nbytes for layer in quant.cache.layers)
        assert summary["kv_kept_bytes"] < fresh.cache.kv_summary()["kv_kept_bytes"]
        assert summary["kv_kept_tokens"] == fresh.cache.kv_summary()["kv_kept_tokens"]


def test_per_head_kivi_batched_equals_alone(llama):
    assert_batched_equals_alone(llama, {"name": "knorm", "heads": "ada", "quant": "kivi4", **SETTINGS}, 20, seed=9)
