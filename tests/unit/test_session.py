"""The public engine API (Session, compress, kv_summary) against an independent reference: the same tiny Llama
run by transformers with its plain sdpa attention, and a hand-written attention mask for StreamingLLM."""

from __future__ import annotations

import copy

import pytest
import torch

import kvbench
from kvbench import engine, methods
from kvbench.engine.attention import NAME
from kvbench.models import load

from ..conftest import TINY, tiny_cfg

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model(tiny_gqa):
    """conftest's tiny GQA Llama (2 layers, 4 query heads, 2 KV heads), kvbench attention over sdpa."""
    model, _ = tiny_gqa
    engine.install(model, "sdpa")
    assert model.config._attn_implementation == NAME
    return model


def plain_model():
    """The same weights (same config, same seed), with transformers' own sdpa attention."""
    model, _ = load(tiny_cfg())
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def reference(model):
    ref = plain_model()
    assert ref.config._attn_implementation == "sdpa"
    mine, theirs = model.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    return ref


def prompt(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 260, (batch, n), generator=g)  # no bos / eos / pad ids


def hf_greedy(ref, ids: torch.Tensor, n: int) -> list[list[int]]:
    config = copy.deepcopy(ref.generation_config)
    config.eos_token_id = None  # never stop early: the session has no stop tokens either
    config.do_sample, config.max_new_tokens, config.min_new_tokens = False, n, n
    with torch.no_grad():
        out = ref.generate(ids, generation_config=config)
    assert out.shape == (ids.shape[0], ids.shape[1] + n)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("batch", [1, 2])
def test_full_session_generates_as_transformers(model, reference, batch):
    ids = prompt(24, batch)
    session = kvbench.Session(model, methods.build({"name": "full"}), None)
    result = session.generate(ids, NEW_TOKENS)
    assert result.tokens == hf_greedy(reference, ids, NEW_TOKENS)
    assert all(len(t) == NEW_TOKENS for t in result.tokens)
    # a full cache keeps everything: the prompt and the decoded tokens fed back (all but the last)
    summary = session.kv_summary()
    assert summary["kv_kept_tokens"] == summary["kv_full_tokens"] == TINY["num_hidden_layers"] * TINY[
        "num_key_value_heads"] * (24 + NEW_TOKENS - 1)
    assert result.prompt_kv["kv_kept_tokens"] == TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * 24


def test_full_session_logits_match_transformers(model, reference):
    ids = prompt(20, seed=1)
    session = kvbench.Session(model, methods.build({"name": "full"}), None)
    with torch.no_grad():
        expected = reference(torch.cat([ids, ids[:, :3]], dim=1)).logits
        got = [session.prefill(ids)[:, -1]]
        for i in range(3):
            got.append(session.step(ids[:, i : i + 1])[:, -1])
    torch.testing.assert_close(torch.stack(got, 1), expected[:, 19:23], rtol=1e-4, atol=1e-4)


def test_step_before_prefill_raises(model):
    session = kvbench.Session(model, methods.build({"name": "full"}), None)
    with torch.no_grad(), pytest.raises(RuntimeError, match="before Session.prefill"):
        session.step(prompt(1))


def test_second_prefill_raises(model):
    session = kvbench.Session(model, methods.build({"name": "full"}), None)
    with torch.no_grad():
        session.prefill(prompt(8))
        with pytest.raises(RuntimeError, match="already"):
            session.prefill(prompt(8, seed=1))
        session.step(prompt(1))  # the session is still usable after the refused prefill


def test_generate_twice_on_one_session_raises(model):
    session = kvbench.Session(model, methods.build({"name": "full"}), None)
    session.generate(prompt(8), 2)
    with pytest.raises(RuntimeError):
        session.generate(prompt(8), 2)


def test_stream_steps_at_once(model, reference):
    """stream=True: no prompt, every token is a decode step; with a full cache, the logits of a forward pass."""
    ids = prompt(12, seed=2)
    session = kvbench.Session(model, methods.build({"name": "full"}), None, stream=True)
    with torch.no_grad():
        got = torch.cat([session.step(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
        expected = reference(ids).logits
        with pytest.raises(RuntimeError, match="already"):
            session.prefill(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- kvbench.compress with StreamingLLM


BUDGET, SINKS, PROMPT, GENERATE = 16, 4, 40, 4


def streamingllm_reference(ref, ids: torch.Tensor, n: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens and their logits from transformers with a full cache whose dropped positions are masked out.

    StreamingLLM at stage prefill, positions original: the prompt attends to itself in full (each layer is cut
    after its attention), then decoding sees the 4 sinks, the last BUDGET - 4 prompt tokens and every decoded
    token, keys at their original positions."""
    dropped = torch.zeros(PROMPT + n, dtype=torch.bool)
    dropped[SINKS : PROMPT - (BUDGET - SINKS)] = True
    with torch.no_grad():
        out = ref(ids, use_cache=True)
        past, logits = out.past_key_values, [out.logits[:, -1]]
        tokens = [logits[-1].argmax(-1)]
        for step in range(1, n):
            total = PROMPT + step
            mask = (~dropped[:total]).long()[None].expand(ids.shape[0], -1)
            out = ref(tokens[-1][:, None], past_key_values=past, attention_mask=mask, use_cache=True,
                      position_ids=torch.tensor([[total - 1]]))
            past = out.past_key_values
            logits.append(out.logits[:, -1])
            tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1).tolist(), torch.stack(logits, 1)


def test_compress_streamingllm_against_masked_reference(reference):
    plain = plain_model()
    ids = prompt(PROMPT, seed=3)
    layers, kv_heads = TINY["num_hidden_layers"], TINY["num_key_value_heads"]
    with kvbench.compress(plain, method="streamingllm", budget=BUDGET) as s:
        assert plain.config._attn_implementation == NAME
        result = s.generate(ids, GENERATE)
        summary = s.kv_summary()
        kept_positions = [layer.view("pos")[0].tolist() for layer in s.cache.layers]
    assert plain.config._attn_implementation == "sdpa"

    expected_tokens, _ = streamingllm_reference(reference, ids, GENERATE)
    assert result.tokens == expected_tokens
    assert len(result.tokens[0]) == GENERATE

    # the prompt cut to the budget: 4 sinks and the 12 most recent prompt tokens, in every layer and KV head
    assert result.prompt_kv["kv_kept_tokens"] == BUDGET * layers * kv_heads
    assert result.prompt_kv["kv_full_tokens"] == PROMPT * layers * kv_heads
    # stage prefill: decoding appends without evicting; generate() feeds back all but its last token
    appended = GENERATE - 1
    expected_positions = [*range(SINKS), *range(PROMPT - (BUDGET - SINKS), PROMPT), *range(PROMPT, PROMPT + appended)]
    for per_head in kept_positions:
        assert len(per_head) == kv_heads
        for positions in per_head:
            assert sorted(positions) == expected_positions
    assert summary["kv_kept_tokens"] == BUDGET * layers * kv_heads + appended * layers * kv_heads
    assert summary["kv_full_tokens"] == (PROMPT + appended) * layers * kv_heads
    assert summary["kv_seen_tokens"] == PROMPT + appended
    assert summary["kv_kept_per_layer_head"] == [[BUDGET + appended] * kv_heads] * layers
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    assert summary["kv_kept_bytes"] == summary["kv_kept_tokens"] * 2 * head_dim * 4  # float32 keys and values


def test_compress_streamingllm_logits_against_masked_reference(reference):
    plain = plain_model()
    ids = prompt(PROMPT, seed=5)
    expected_tokens, expected_logits = streamingllm_reference(reference, ids, GENERATE)
    with kvbench.compress(plain, method="streamingllm", budget=BUDGET) as s, torch.no_grad():
        logits = [s.prefill(ids)[:, -1]]
        for token in expected_tokens[0][:-1]:
            logits.append(s.step(torch.tensor([[token]]))[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), expected_logits, rtol=1e-4, atol=1e-4)
    # and not the full cache's: the dropped middle of the prompt changes the decode steps' logits
    with torch.no_grad():
        full = reference(torch.cat([ids, torch.tensor(expected_tokens)[:, :-1]], 1)).logits[:, PROMPT - 1 :]
    assert (full[:, 1:] - expected_logits[:, 1:]).abs().max() > 1e-2


def test_compress_restores_attention_and_outputs(reference):
    plain = plain_model()
    ids = prompt(24, seed=4)
    before = hf_greedy(plain, ids, 4)
    with kvbench.compress(plain, method="streamingllm", budget=BUDGET):
        pass
    assert plain.config._attn_implementation == "sdpa"
    assert hf_greedy(plain, ids, 4) == before == hf_greedy(reference, ids, 4)


def test_compress_restores_attention_after_an_error():
    plain = plain_model()
    with pytest.raises(ValueError, match="inside"), kvbench.compress(plain, method="full"):
        assert plain.config._attn_implementation == NAME
        raise ValueError("inside")
    assert plain.config._attn_implementation == "sdpa"


def test_compress_on_an_installed_model_leaves_it_installed(model):
    with kvbench.compress(model, method="streamingllm", budget=BUDGET) as s:
        s.generate(prompt(PROMPT), 2)
    assert model.config._attn_implementation == NAME


def test_compress_budget_ratio():
    plain = plain_model()
    with kvbench.compress(plain, method="streamingllm", budget=0.5) as s:
        s.generate(prompt(PROMPT), 1)
        layers, kv_heads = TINY["num_hidden_layers"], TINY["num_key_value_heads"]
        assert s.kv_summary()["kv_kept_tokens"] == (PROMPT // 2) * layers * kv_heads


@pytest.mark.parametrize("budget", [True, "16", [16]])
def test_compress_rejects_bad_budgets(budget):
    plain = plain_model()
    with pytest.raises(kvbench.KVBenchError), kvbench.compress(plain, method="full", budget=budget):
        pass
    assert plain.config._attn_implementation == "sdpa"


def test_budget_arguments_of_the_api():
    from kvbench.api import _budget
    from kvbench.errors import KVBenchError

    assert _budget(128) == kvbench.Budget(tokens=128) and _budget(0.5) == kvbench.Budget(ratio=0.5)
    assert _budget(None) == kvbench.Budget() and _budget(256.0) == kvbench.Budget(tokens=256)
    for bad in ("128", True, 0, -0.5):
        with pytest.raises(KVBenchError):
            _budget(bad)
