"""The family matrix of issue 21, printed: every method (and its decode-stage / shifted-position variants)
on a tiny random model of each decoder family, at a budget above everything it will hold, against the model
itself (its logits over the prompt and every decode step, fp32; its `generate` tokens); and the families
kvbench refuses, with the one line a user gets.

    python scripts/family_matrix.py            # about 40 s on 2 CPU cores
    python scripts/family_matrix.py --base eager --prompt 64 --new 16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from kvbench.check import write_random_head_scores
from kvbench.engine import install
from kvbench.errors import KVBenchError
from kvbench.models.families import (
    FAMILIES,
    REFUSED,
    compare_with_model,
    method_variants,
    tiny_config,
    tiny_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="sdpa", choices=["sdpa", "eager"], help="base attention kvbench delegates to")
    parser.add_argument("--prompt", type=int, default=40, help="prompt tokens (the tiny windows are 12)")
    parser.add_argument("--new", type=int, default=8, help="greedy new tokens")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    prompt = torch.randint(1, 128, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    print("| family | layers (window) | methods | max logit difference | same `generate` tokens | verdict |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for family in FAMILIES:
            model = tiny_model(family)
            config = model.config
            scores = write_random_head_scores(Path(scratch) / f"{family}.json", config.num_hidden_layers,
                                              config.num_attention_heads)
            rows = {name: compare_with_model(model, settings, prompt, args.new, args.prompt + args.new + 8, args.base)
                    for name, settings in method_variants(scores).items()}
            worst = max(row["max_logit_diff"] for row in rows.values())
            same = sum(row["same_tokens"] for row in rows.values())
            kinds = next(iter(rows.values()))["kv_layer_types"]
            layers = ", ".join(f"{entry['layers']} {kind.split('_')[0]}" + (f" ({entry['window']})" if entry["window"] else "")
                               for kind, entry in kinds.items())
            verdict = "equal" if worst <= 1e-5 and same == len(rows) else "DIFFERS"
            print(f"| {family} | {layers} | {len(rows)} | {worst:.1e} | {same}/{len(rows)} | {verdict} |")
    for family in REFUSED:
        try:
            install(type("M", (), {"config": tiny_config(family)})(), args.base)
            line = "served (not refused)"
        except KVBenchError as error:
            line = f"refused: {error}"
        print(f"| {family} | | | | | {line} |")


if __name__ == "__main__":
    main()
