"""Estimate HeadKV head-importance scores (R and R2) for a model and write them in the published format.

    python scripts/estimate_head_scores.py model=llama2-7b-chat                 # GPU; both variants
    python scripts/estimate_head_scores.py model=tiny lengths=2 depths=2 min_length=400 max_length=800

Writes <output_dir>/<model.name>_<variant>.json, which `method=headkv` reads by default
(method.head_scores=PATH for any other file). The rules are HeadKV's official detection scripts
(FYYFU/HeadKV Important_Head/retrieval_head_detection.py and _r2.py; details in kvbench/headscores.py):
the raw question prompt "Based on the content of the book, Question: ...\nAnswer:" without a chat
template; context lengths round(linspace(0, 10000, 5)) capped at the model's max_prompt_tokens, of which
200 tokens are left for the question; depths round(linspace(0, 100, 10)) percent, the needle placed after
a sentence; greedy decoding of at most 50 tokens; only the needle's answer span is credited, divided by
its length (R: top-1 position holding the generated token; R2: the top-|span| weights inside the span);
R stops at a newline, R2 at a newline, EOS or the answer's token count; a run counts when it succeeds by
the official test (R: ROUGE-1 recall > 50; R2: QA-F1 > 50).

Remaining differences from the official scripts, and why:
- our own needles (3 for R, 2 for R2, the same shapes: a fact with an answer span; two people, two facts
  and an age comparison) and our own haystack (kvbench/assets/haystack.txt, ~14k words, written by hand
  and by scripts/make_haystack.py, long enough never to repeat inside a prompt; the official repeats its
  essay files when a prompt is longer than them, and uses a different file per needle);
- spans are exact (the prompt is built from token pieces); the official re-tokenises the decoded text
  and looks for the span by token overlap;
- "newline" is the tokenizer's newline token; the official compares with SentencePiece's '<0x0A>' and
  id 144, so its R runs on Llama-3 (whose newline is neither) go on to 50 tokens;
- attention rows are float32 softmaxes of the model's queries and keys; the official reads the model's
  attention output in its dtype (bf16), where top-k ties are common;
- lengths above the model's max_prompt_tokens are capped to it (the official runs 0..10000 on every
  model); a prompt longer than the haystack is an error rather than a repeat;
- each run writes its files fresh; the official appends to an existing score file.
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

from kvbench import models
from kvbench.errors import KVBenchError
from kvbench.methods.head_scores import write_head_scores
from kvbench.resources import CONFIG_DIR
from papers.head_scores import NEEDLES, estimate_head_scores, official_depths, official_lengths

log = logging.getLogger("kvbench")


def estimate(cfg: DictConfig) -> list[Path]:
    torch.manual_seed(cfg.seed)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model, tokenizer = models.load(model_cfg)
    cap = model_cfg.get("max_prompt_tokens")
    requested = cfg.max_length or cap
    if not requested:
        raise KVBenchError("set max_length=N (the model config has no max_prompt_tokens)")
    max_length = min(requested, cap) if cap else requested
    if cfg.min_length > max_length:
        raise KVBenchError(f"min_length={cfg.min_length} is above max_length={max_length} (capped at the model's)")
    lengths = official_lengths(cfg.min_length, requested, cfg.lengths, max_length)
    depths = official_depths(cfg.depths)
    written = []
    for variant in cfg.variants:
        if variant not in NEEDLES:
            raise KVBenchError(f"variants: {variant} is not one of: {', '.join(NEEDLES)}")
        total = len(NEEDLES[variant]) * len(lengths) * len(depths)
        log.info("%s: lengths %s, depths %s%%", variant, lengths, depths)
        with tqdm(total=total, desc=f"{model_cfg['name']} {variant}", unit="run") as progress:
            scores, summary = estimate_head_scores(
                model, tokenizer, variant, lengths, depths, cfg.max_new_tokens, cfg.only_successful, progress=progress,
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
