"""Helpers several test files share (fixtures are in conftest.py): fake attention modules, brute-force maths,
head-score files, run folders on disk, and where the repository's data lives."""

import json
import math
from pathlib import Path

import yaml

from kvbench.methods.head_scores import write_head_scores

ROOT = Path(__file__).resolve().parent.parent
LONGBENCH_FIXTURES = ROOT / "papers" / "smoke" / "longbench"  # 2 rows per LongBench task (papers/smoke/make_longbench_fixtures.py)
HEAD_SCORES = ROOT / "papers" / "smoke" / "head_scores" / "tiny-random_r2.json"  # scripts/estimate_head_scores.py


class FakeModule:
    def __init__(self, base, layer_idx=0, groups=1):
        self.num_key_value_groups = groups
        self.config = type("C", (), {"kvbench_base_attention": base})()
        self.layer_idx = layer_idx
        self.is_causal = True
        self.training = False


D = 8
SCALING = D**-0.5


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def softmax(logits):
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def token_lists(reference, q, k, v, **fields) -> dict:
    """For a brute-force reference: set its shape (B, Hq, Hkv, G, seen) from q and k, and return the prompt
    as one list of token dicts {pos, k, v, **fields} per (batch, kv head)."""
    reference.B, reference.Hq, n, _ = q.shape
    reference.Hkv = k.shape[1]
    reference.G = reference.Hq // reference.Hkv
    reference.seen = n
    return {(b, h): [{"pos": j, "k": k[b, h, j].tolist(), "v": v[b, h, j].tolist(), **fields} for j in range(n)]
            for b in range(reference.B) for h in range(reference.Hkv)}


def scores_file(tmp_path, importance, name="scores.json"):
    """A score file in the published format from an importance table (layers, query heads)."""
    path = tmp_path / name
    write_head_scores(path, {(layer, h): [v, v] for layer, row in enumerate(importance) for h, v in enumerate(row)})
    return path


def ragged_kept(layer):
    r = layer.ragged
    pos = r.prefix_pos.tolist()
    starts = r.cu_lens.tolist()
    return [[pos[starts[b * r.heads + h]: starts[b * r.heads + h + 1]] for h in range(r.heads)] for b in range(r.batch)]


TASK_NAMES = {"passkey": "passkey", "multikey": "multikey", "passkey_prose": "passkey"}


def fake_run(root, model, task, method, budget, scores, tokens=None, *, ratio=None, n=3, folder_name=None,
             task_cfg=None, method_name=None, kept=None, records=None):
    """A finished run folder: scores.json, config.yaml (and meta.json when `kept` tokens per head are given);
    with `records`, predictions.jsonl and the intervals in scores.json (the runner's own summary)."""
    from kvbench import tasks
    from kvbench.runner.scoring import summarize

    folder = root / "runs" / model / task / method / (folder_name or budget)
    folder.mkdir(parents=True)
    labels = {"model": model, "task": task, "method": method, "budget": budget}
    name = TASK_NAMES.get(task, "perplexity" if task.startswith("ppl_") else "longbench" if "longbench" in task else task)
    cfg = {"model": {"name": model}, "task": {"name": name, **(task_cfg or {})},
           "method": {"name": method_name or method.split("-")[0]}, "budget": {"tokens": tokens, "ratio": ratio}}
    summary = {**labels, "scores": scores, "n": n}
    if records is not None:
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = summarize(tasks.build(cfg["task"]), labels, records)
    (folder / "scores.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    if kept is not None:
        (folder / "meta.json").write_text(json.dumps({"kv": {"kv_kept_tokens_per_layer_head": [[kept, kept]]}}))
    return folder


def assert_batched_equals_alone(model, settings, budget: int, seed: int = 1, lengths=(40, 23, 57, 31), new: int = 6):
    """Four prompts of mixed lengths decoded together (batch 4) give each one's tokens alone."""
    import torch

    from kvbench.engine import Budget, Session
    from kvbench.engine.batch import Request, decode_together
    from kvbench.methods import build

    g = torch.Generator().manual_seed(seed)
    requests = [Request(torch.randint(0, 128, (1, n), generator=g), new, []) for n in lengths]
    together = dict(decode_together(model, requests, build(settings), Budget(tokens=budget), 4))
    for i, request in enumerate(requests):
        session = Session(model, build(settings), Budget(tokens=budget), reserve=new)
        assert together[i].tokens == session.generate(request.input_ids, new, []).tokens[0], (settings, i)


def one_layer_cache(cfg, budget: int, q, k, v, module=None):
    """A one-layer CompressedCache after the prompt (q, k, v) went through kvbench's attention."""
    from types import SimpleNamespace

    from kvbench.engine import Budget, CompressedCache
    from kvbench.engine.attention import kvbench_attention
    from kvbench.methods import build

    cache = CompressedCache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1)), build(cfg),
                            Budget(tokens=budget))
    keys, values = cache.update(k, v, 0)
    module = module or FakeModule("sdpa", groups=q.shape[1] // k.shape[1])
    kvbench_attention(module, q, keys, values, None, scaling=SCALING, kvbench_cache=cache)
    return cache
