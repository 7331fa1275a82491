"""Batched evaluation (issue 23): sequences decoded together give, in float32, the tokens each gives alone,
for every method and variant, token and ratio budgets, mixed prompt lengths and answer lengths, stop
tokens, GQA, sliding-window and hybrid families; the runner's records are those of batch 1."""

import json

import pytest
import torch

from kvbench.engine import Budget, Session, install
from kvbench.engine.batch import BatchedCache, Request, decode_together
from kvbench.engine.types import RepeatPrompts
from kvbench.methods import build
from kvbench.models.families import method_variants, tiny_model
from tests.helpers import HEAD_SCORES

LENGTHS = [40, 23, 57, 31, 40, 64, 19, 48, 35]  # mixed, two equal
NEW = [12, 20, 7, 16, 20, 3, 20, 9, 14]  # mixed; stop token 5 ends some early
STOP = 5


REPEAT = RepeatPrompts(2, torch.tensor([7, 8, 9]), torch.tensor([10, 11]), torch.tensor([12]))  # for kvzip


def requests():
    g = torch.Generator().manual_seed(1)
    return [Request(torch.randint(0, 128, (1, n), generator=g), new, [STOP], repeat=REPEAT)
            for n, new in zip(LENGTHS, NEW)]


def alone(model, settings, budget, request):
    session = Session(model, build(settings), budget, reserve=request.max_new_tokens, repeat=request.repeat)
    return session.generate(request.input_ids, request.max_new_tokens, request.stop_token_ids).tokens[0]


def mismatches(model, budgets, batch_size=4):
    """(variant, budget, request index) where batch `batch_size` differs from batch 1, over every variant."""
    out = []
    for name, settings in method_variants(str(HEAD_SCORES)).items():
        for budget in budgets:
            together = dict(decode_together(model, requests(), build(settings), budget, batch_size))
            for i, request in enumerate(requests()):
                if together[i].tokens != alone(model, settings, budget, request):
                    out.append((name, budget.label, i))
    return out


@pytest.mark.parametrize(("family", "budgets"), [
    ("llama", [Budget(tokens=16), Budget(ratio=0.5)]),  # GQA 4/2; headkv's score file is for 2 layers x 4 heads
    ("gemma2", [Budget(tokens=16)]),  # sliding + full layers, softcap
    ("gpt_oss", [Budget(tokens=16)]),  # sliding + full layers, attention sinks, MoE
])
def test_every_method_batched_equals_batch_one(family, budgets):
    model = tiny_model(family, num_hidden_layers=2)
    install(model, "sdpa")
    assert mismatches(model, budgets) == []


def test_decode_together_yields_each_as_it_finishes_and_refills(tiny_gqa):
    model, _ = tiny_gqa
    order = [i for i, _ in decode_together(model, requests(), build({"name": "snapkv"}), Budget(tokens=16), 3)]
    assert sorted(order) == list(range(len(LENGTHS)))
    assert order != sorted(order)  # a short answer finishes before a long one started earlier
    done = dict(decode_together(model, requests(), build({"name": "h2o", "stage": "decode"}), Budget(tokens=16), 3))
    for i, request in enumerate(requests()):
        assert len(done[i].tokens) <= request.max_new_tokens
        kv = done[i].session.kv_summary()
        assert kv["kv_seen_tokens"] == LENGTHS[i] + len(done[i].tokens) - (len(done[i].tokens) == request.max_new_tokens)
        assert max(max(row) for row in kv["kv_kept_per_layer_head"]) <= 16  # each sequence held its own budget


def test_admission_waits_for_room_but_never_stalls(tiny_gqa):
    model, _ = tiny_gqa
    sizes = []

    def admit(request, active):
        sizes.append(active)
        return active < 2  # room for two

    done = dict(decode_together(model, requests(), build({"name": "full"}), None, 8, admit))
    assert len(done) == len(LENGTHS) and max(sizes) <= 2


def test_auto_batch_size_is_admitted_by_free_memory(tiny_gqa, monkeypatch):
    from kvbench.engine import batch

    model, _ = tiny_gqa
    assert batch.batch_plan(model, 3, torch.device("cpu")) == (3, None)
    size, admit = batch.batch_plan(model, "auto", torch.device("cpu"))
    assert size == batch.AUTO_BATCH["cpu"] == 8
    request = requests()[0]  # 40 + 12 tokens x 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes = 26,624 bytes
    monkeypatch.setattr(batch, "free_memory", lambda device: 2 * 26_624 + 1)
    assert admit(request, 1)
    monkeypatch.setattr(batch, "free_memory", lambda device: 2 * 26_624 - 1)
    assert not admit(request, 1)


def test_batched_cache_gives_each_sequence_its_positions(tiny_gqa):
    model, _ = tiny_gqa
    caches = []
    for n in (7, 12):
        session = Session(model, build({"name": "streamingllm", "positions": "shifted"}), Budget(tokens=8))
        session.prefill(torch.arange(1, n + 1)[None])
        caches.append(session.cache)
    ids = BatchedCache(caches).next_position_ids(1)
    assert ids.tolist() == [[7], [8]]  # original length 7 (under budget); 12 compacted to 8 slots: shifted to 8


def test_run_batch_size_writes_the_records_of_batch_one(tmp_path):
    import kvbench
    from kvbench.errors import KVBenchError

    small = {"task.num_samples": 5, "task.context_tokens": 300, "results": tmp_path}
    one = kvbench.evaluate(model="tiny", method="snapkv", budget=24, run__batch_size=1, **small)
    folder = one.path
    (folder / "scores.json").unlink()
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    (folder / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n")  # resume with 3 samples to do
    again = kvbench.evaluate(model="tiny", method="snapkv", budget=24, run__batch_size=3, **small)
    assert again.path == folder
    strip = lambda r: {k: v for k, v in r.items() if "seconds" not in k}  # noqa: E731
    assert [strip(r) for r in again.records] == [strip(r) for r in one.records]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["batch_size"] == 3 and meta["samples_this_session"] == 3
    assert meta["timing"]["samples_per_s"] > 0
    with pytest.raises(KVBenchError, match="run.batch_size=0 must be a whole number >= 1 or auto"):
        kvbench.evaluate(model="tiny", method="snapkv", budget=24, run__batch_size=0, **small)
    with pytest.raises(KVBenchError, match="run.batchsize is not a setting"):
        kvbench.evaluate(model="tiny", run__batchsize=2, **small)
