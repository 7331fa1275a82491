"""Estimate HeadKV head-importance scores (R and R2) for a model and write them in the published format.

    python scripts/estimate_head_scores.py model=llama2-7b-chat                 # GPU; both variants
    python scripts/estimate_head_scores.py model=tiny lengths=2 depths=2 min_length=200 max_length=400

Writes <output_dir>/<model.name>_<variant>.json, which `method=headkv` reads by default
(method.head_scores=PATH for any other file). See kvbench/headscores.py for the scoring rules.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kvbench import KVBenchError, models
from kvbench.headscores import NEEDLES, estimate_head_scores, write_head_scores

log = logging.getLogger("kvbench")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def evenly(lo: float, hi: float, count: int) -> list[float]:
    return [lo] if count == 1 else [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def estimate(cfg: DictConfig) -> list[Path]:
    torch.manual_seed(cfg.seed)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model, tokenizer = models.load(model_cfg)
    max_length = cfg.max_length or model_cfg.get("max_prompt_tokens")
    if not max_length:
        raise KVBenchError("set max_length=N (the model config has no max_prompt_tokens)")
    if cfg.min_length > max_length:
        raise KVBenchError(f"min_length={cfg.min_length} is above max_length={max_length}")
    lengths = [round(x) for x in evenly(cfg.min_length, max_length, cfg.lengths)]
    depths = evenly(0.0, 1.0, cfg.depths)
    written = []
    for variant in cfg.variants:
        if variant not in NEEDLES:
            raise KVBenchError(f"variants: {variant} is not one of: {', '.join(NEEDLES)}")
        total = len(NEEDLES[variant]) * len(lengths) * len(depths)
        with tqdm(total=total, desc=f"{model_cfg['name']} {variant}", unit="run") as progress:
            scores, summary = estimate_head_scores(
                model, tokenizer, variant, lengths, depths, cfg.max_new_tokens,
                model_cfg.get("chat_format", "none"), cfg.only_successful, progress=progress,
            )
        if summary["counted"] == 0:
            log.warning("%s: no run answered correctly; every head scores 0 (HeadKV then splits evenly)", variant)
        path = Path(cfg.output_dir) / f"{model_cfg['name']}_{variant}.json"
        write_head_scores(path, scores)
        log.info("%s: %s -> %s", variant, json.dumps(summary), path)
        written.append(path)
    return written


@hydra.main(config_path=str(CONFIG_DIR), config_name="estimate_head_scores", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        estimate(cfg)
    except KVBenchError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
