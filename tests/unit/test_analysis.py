"""The value-norm profile: norms equal the cache's values, attention received sums to the query count."""

import json

import torch
from transformers import DynamicCache

from papers.value_norms import value_norm_profile


def test_profile_matches_the_cache_values_and_restores_attention(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(5, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    before = model.config._attn_implementation
    layers = value_norm_profile(model, ids, sinks=3)
    assert model.config._attn_implementation == before
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        reference = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        again = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(reference, again, atol=1e-5)  # the model still runs as before
    assert len(layers) == model.config.num_hidden_layers
    for layer, cached in zip(layers, cache.layers):
        norms = cached.values[0].abs().sum(-1).mean(0)
        assert torch.allclose(torch.tensor(layer["value_norm_l1"]), norms, atol=1e-3)
        received = torch.tensor(layer["attention_received"])
        assert abs(received.sum().item() - 48) < 1e-2  # every query's attention sums to 1
        assert layer["sink_positions"] == sorted(torch.topk(received, 3).indices.tolist())


def test_script_writes_the_json_and_rejects_an_unknown_model(tmp_path, capsys):
    from papers.value_norms import main

    assert main(["--tokens", "64", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "analysis" / "value_norms_tiny.json").read_text())
    assert data["tokens"] == 64 and len(data["layers"][0]["value_norm_l1"]) == 64
    assert main(["--model", "gpt5", "--results", str(tmp_path)]) == 2
    assert "unknown model 'gpt5'; choose one of" in capsys.readouterr().err
