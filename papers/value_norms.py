"""Value-vector norms and attention sinks per layer: the data behind VATP's motivating figure.

VATP (arXiv 2406.12335) observes that the tokens receiving the most attention
(the attention sinks, usually the first tokens) have tiny value vectors, so
attention alone overstates their importance; it scores tokens by
`I_j = s_j · ||v_j||_1`. `value_norm_profile` runs one prompt through a model
and returns, per layer, the ℓ1 norm of each token's value vector (mean over KV
heads) and the attention it receives `s_j = Σ_i A_ij` (mean over heads, the
block-wise column sums of kvbench.engine.attention: no n×n matrix), plus the `sinks`
positions that receive the most attention. `write_value_norms` stores that
under `results/analysis/` for papers.plots.

    python -m papers.value_norms                                  # tiny model, synthetic text
    python -m papers.value_norms --model llama2-7b-chat --source pg19 --tokens 4096
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvbench.engine.attention import attention_column_sums, attention_function
from kvbench.errors import KVBenchError
from kvbench.resources import CONFIG_DIR
from kvbench.runner.folder import atomic_write_json, safe_label
from kvbench.runner.main import check_overrides

PROBE = "kvbench_value_probe"


@torch.inference_mode()
def value_norm_profile(model, input_ids: torch.Tensor, sinks: int = 4) -> list[dict]:
    """Per layer: value ℓ1 norm and attention received of every token of `input_ids` (1, n)."""
    layers: dict[int, dict] = {}

    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        received = attention_column_sums(query, key, scaling)[0].mean(0)  # (n,)
        norms = value[0].float().abs().sum(-1).mean(0)  # (n,): ℓ1 over head_dim, mean over KV heads
        top = torch.topk(received, min(sinks, received.numel())).indices.sort().values
        layers[module.layer_idx] = {
            "layer": module.layer_idx,
            "value_norm_l1": [round(x, 4) for x in norms.tolist()],
            "attention_received": [round(x, 4) for x in received.tolist()],
            "sink_positions": top.tolist(),
        }
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout, is_causal=True)

    with attention_function(model, PROBE, probe):
        model(input_ids=input_ids, use_cache=False)
    return [layers[i] for i in sorted(layers)]


def write_value_norms(model_cfg: dict, source: str = "synthetic", tokens: int = 1024, sinks: int = 4,
                      results: str | Path = "results") -> Path:
    """Profile the first `tokens` tokens of the first document of `source`; write results/analysis/*.json."""
    from kvbench import models
    from kvbench.tasks.perplexity import DATASETS, load_documents

    model, tokenizer = models.load(model_cfg)
    hub, config, split, field = DATASETS.get(source, (source, None, "test", "text"))
    text = load_documents(hub, config, split, field)[0]
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(text).input_ids[:tokens]], device=device)
    out = Path(results) / "analysis" / f"value_norms_{safe_label(model_cfg['name'])}.json"
    atomic_write_json(out, {
        "model": model_cfg["name"], "source": source, "tokens": ids.shape[1], "sinks": sinks,
        "layers": value_norm_profile(model, ids, sinks),
    })
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Value-vector norms and attention sinks per layer of one text (VATP's figure).")
    parser.add_argument("--model", default="tiny", help="a configs/model/ name")
    parser.add_argument("--source", default="synthetic", help="pg19 | proofpile | arxiv | openwebtext2 | synthetic | a file")
    parser.add_argument("--tokens", type=int, default=1024, help="the first N tokens of the text")
    parser.add_argument("--sinks", type=int, default=4, help="how many most-attended tokens to mark per layer")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    try:
        problem = check_overrides([f"model={args.model}"])
        if problem:
            raise KVBenchError(problem)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"model={args.model}"])
        path = write_value_norms(OmegaConf.to_container(cfg.model, resolve=True), args.source, args.tokens,
                                 args.sinks, args.results)
    except KVBenchError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
