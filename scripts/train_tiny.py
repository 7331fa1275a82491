"""Train kvbench's tiny Llama on synthetic long-context documents, on the CPU, and save it for `model=tiny`.

    python scripts/train_tiny.py                        # configs/train/tiny.yaml: ~18 minutes on 2 cores
    python scripts/train_tiny.py max_minutes=2 out=scratch/tiny-test

The documents (kvbench.tasks.synthetic.training_document) mix passkey and
multi-key retrieval, where the answer must be copied from far back, with
filler text from a seeded grammar, which rewards local context. The context
length grows through a curriculum on a wall-clock budget; answer tokens weigh
more in the loss. Every `eval.every_seconds`, passkey accuracy at
`eval.context_tokens` with a full cache is measured through kvbench's own
generation path. The result is an HF folder (`save_pretrained`, safetensors)
with the byte tokenizer and a `training.json` log, loadable offline by
AutoModelForCausalLM.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf


def make_batch(rng: random.Random, tokenizer, length: int, batch: int, mix: dict, answer_weight: float):
    from kvbench.tasks.synthetic import training_document

    kinds, weights = zip(*mix.items())
    ids, loss_weights = [], []
    for _ in range(batch):
        kind = rng.choices(kinds, weights)[0]
        text, answer_at = training_document(kind, rng, length - 1)  # + BOS = `length` tokens
        row = tokenizer(text).input_ids
        assert len(row) == length, (len(row), length)
        w = [1.0] * length
        if answer_at >= 0:
            for i in range(answer_at + 1, length):  # token i predicts nothing; target i is scored at i - 1
                w[i] = answer_weight
        ids.append(row)
        loss_weights.append(w)
    return torch.tensor(ids), torch.tensor(loss_weights)


def passkey_accuracy(model, tokenizer, context_tokens: int, num_samples: int) -> float:
    from kvbench.engine.attention import install
    from kvbench.methods import build
    from kvbench.models.generator import Generator
    from kvbench.tasks.synthetic import Passkey

    model.eval()
    install(model, "sdpa")
    task = Passkey(num_samples=num_samples, context_tokens=context_tokens, seed=12345)
    generator = Generator(model, tokenizer, build({"name": "full"}))
    records = [task.evaluate(s, generator) for s in task.samples(tokenizer)]
    correct = sum(r["score"] for r in records)
    print(f"    e.g. answer {records[0]['answers'][0]} -> {records[0]['prediction']!r}", flush=True)
    model.set_attn_implementation("sdpa")
    model.train()
    return correct / num_samples


@hydra.main(config_path="../configs/train", config_name="tiny", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from kvbench.models.loading import build_tiny

    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, tokenizer = build_tiny(OmegaConf.to_container(cfg.model), seed=cfg.seed)
    model.set_attn_implementation("sdpa")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=(0.9, 0.95),
    )
    budget = cfg.max_minutes * 60
    bounds = [sum(cfg.data.stage_fractions[: i + 1]) * budget for i in range(len(cfg.data.lengths))]
    log = {"config": OmegaConf.to_container(cfg), "parameters": n_params, "evals": [], "losses": []}
    print(f"training {n_params:,} parameters for {cfg.max_minutes} minutes")
    start = last_eval = time.perf_counter()
    step = 0
    while (elapsed := time.perf_counter() - start) < budget:
        stage = next(i for i, b in enumerate(bounds) if elapsed < b) if elapsed < bounds[-1] else len(bounds) - 1
        length = cfg.data.lengths[stage]
        batch = max(1, cfg.data.tokens_per_step // length)
        frac = elapsed / budget
        lr = cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup_steps)
        lr *= cfg.optim.min_lr_fraction + (1 - cfg.optim.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in optim.param_groups:
            group["lr"] = lr
        ids, weights = make_batch(rng, tokenizer, length, batch, cfg.data.mix, cfg.data.answer_weight)
        logits = model(input_ids=ids).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (losses * weights[:, 1:]).sum() / weights[:, 1:].sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optim.step()
        step += 1
        if step % 20 == 0:
            log["losses"].append({"step": step, "seconds": round(elapsed, 1), "length": length, "loss": round(loss.item(), 4)})
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  len {length:5d}  loss {loss.item():.4f}  lr {lr:.2e}", flush=True)
        if time.perf_counter() - last_eval > cfg.eval.every_seconds:
            acc = passkey_accuracy(model, tokenizer, cfg.eval.context_tokens, cfg.eval.num_samples)
            short = passkey_accuracy(model, tokenizer, max(length, 256), cfg.eval.num_samples)
            log["evals"].append({"step": step, "minutes": round(elapsed / 60, 2), "passkey_accuracy": acc,
                                 f"passkey_accuracy_{max(length, 256)}": short})
            print(f"  passkey accuracy at {cfg.eval.context_tokens} tokens: {acc:.2f}; "
                  f"at {max(length, 256)}: {short:.2f}", flush=True)
            last_eval = time.perf_counter()
    minutes = (time.perf_counter() - start) / 60
    acc = passkey_accuracy(model, tokenizer, cfg.eval.context_tokens, 100)
    log.update(steps=step, minutes=round(minutes, 2), final_passkey_accuracy=acc)
    print(f"done: {step} steps in {minutes:.1f} min; passkey accuracy at {cfg.eval.context_tokens} tokens "
          f"(100 samples, full cache): {acc:.2f}")
    out = Path(hydra.utils.to_absolute_path(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.config.kvbench_base_attention = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
