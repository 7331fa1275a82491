"""scripts/estimate_duo_patterns.py (DuoAttention's pattern training, mit-han-lab/duo-attention duo_attn/train.py):
the gated attention against explicit loops (alpha 1 = full attention, alpha 0 = sink + recent, the token and the
block-sparse masks, MHA and GQA, a sliding window), the loss and the lr schedule against hand computations, the
gates' gradient against finite differences and their first AdamW step, the passkey data against the reference's
layout, and a short run whose files kvbench's duo_attention method loads and runs with."""

import copy
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvbench.engine import Budget, Session
from kvbench.errors import KVBenchError
from kvbench.methods import build
from kvbench.methods.duo_attention import load_patterns, streaming_count, streaming_heads
from tests.helpers import ragged_kept

ROOT = Path(__file__).resolve().parents[2]


def script():
    path = ROOT / "scripts" / "estimate_duo_patterns.py"
    spec = importlib.util.spec_from_file_location("estimate_duo_patterns", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


est = script()


# ----------------------------------------------------------------------------- explicit-loop references


def full_rule(i, j):
    return j <= i


def token_rule(sink, recent):
    """duo_attn/patch/streaming_attn.py generate_streaming_mask: causal, and j < sink or within recent of i."""
    return lambda i, j: j <= i and (j < sink or i - recent + 1 <= j)


def block_rule(sink, recent, bs):
    """Block-Sparse-Attention's streaming heads: the first ceil(sink/bs) key blocks, and the ceil(recent/bs)
    blocks ending at the query's block, causal inside."""
    sink_blocks = list(range(-(-sink // bs)))
    def rule(i, j):
        local = list(range(i // bs - (-(-recent // bs)) + 1, i // bs + 1))
        return j <= i and (j // bs in sink_blocks or j // bs in local)
    return rule


def windowed(rule, window):
    return lambda i, j: rule(i, j) and j > i - window


def loop_attention(q, k, v, scaling, rule):
    """(B, n, Hq, D) float64: for every query head and position, softmax over the keys `rule` allows."""
    batch, heads, n, dim = q.shape
    groups = heads // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(batch, n, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                keys = [j for j in range(n) if rule(i, j)]
                logits = [float(torch.dot(q[b, h, i], k[b, h // groups, j])) * scaling for j in keys]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for w, j in zip(weights, keys):
                    out[b, i, h] += w / total * v[b, h // groups, j]
    return out


def layer_call(attention, q, k, v, **kwargs):
    return attention(SimpleNamespace(layer_idx=0), q, k, v, None, scaling=0.3, **kwargs)[0]


# ----------------------------------------------------------------------------- (1) gated attention


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mode", ["sdpa", "blocksparse"])
def test_gated_attention_is_full_at_one_and_streaming_at_zero(hkv, mode):
    g = torch.Generator().manual_seed(hkv)
    n, sink, recent, bs = 29, 3, 5, 4
    q, k, v = (torch.randn(1, h, n, 8, generator=g) for h in (4, hkv, hkv))
    rule = token_rule(sink, recent) if mode == "sdpa" else block_rule(sink, recent, bs)
    full, streaming = loop_attention(q, k, v, 0.3, full_rule), loop_attention(q, k, v, 0.3, rule)
    # the two masks differ somewhere, or the test would prove nothing
    assert (full - streaming).abs().max() > 1e-2
    gates = torch.nn.Parameter(torch.ones(1, hkv))
    attention = est.DuoTraining(gates, sink, recent, bs if mode == "blocksparse" else None, query_block=7)
    teacher = layer_call(attention, q, k, v)  # the original model's layer: full causal attention
    torch.testing.assert_close(teacher.double(), full, atol=1e-5, rtol=1e-5)
    attention.teacher = False
    torch.testing.assert_close(layer_call(attention, q, k, v), teacher, atol=0, rtol=0)  # alpha = 1: exactly full
    with torch.no_grad():
        gates.zero_()
    torch.testing.assert_close(layer_call(attention, q, k, v).double(), streaming, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        gates.copy_(torch.linspace(0.2, 0.9, hkv)[None])
    mixed = layer_call(attention, q, k, v).double()
    for h in range(4):
        a = float(gates.detach()[0, h // (4 // hkv)])
        torch.testing.assert_close(mixed[:, :, h], (1 - a) * streaming[:, :, h] + a * full[:, :, h], atol=1e-5,
                                   rtol=1e-5)
    # the full branch is the teacher's (the reference's two-way forward): other student q, k, v change only
    # the streaming branch
    q2 = torch.randn(1, 4, n, 8, generator=g)
    torch.testing.assert_close(layer_call(attention, q2, k, v).double()[:, :, 0],
                               (1 - float(gates.detach()[0, 0])) * loop_attention(q2, k, v, 0.3, rule)[:, :, 0]
                               + float(gates.detach()[0, 0]) * full[:, :, 0], atol=1e-5, rtol=1e-5)


def test_a_sliding_window_applies_to_both_branches():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8,
                                                                                                      generator=g)
    attention = est.DuoTraining(torch.nn.Parameter(torch.zeros(1, 2)), 2, 9, None, query_block=4)
    teacher = layer_call(attention, q, k, v, sliding_window=6)
    torch.testing.assert_close(teacher.double(), loop_attention(q, k, v, 0.3, windowed(full_rule, 6)), atol=1e-5,
                               rtol=1e-5)
    attention.teacher = False
    torch.testing.assert_close(layer_call(attention, q, k, v, sliding_window=6).double(),
                               loop_attention(q, k, v, 0.3, windowed(token_rule(2, 9), 6)), atol=1e-5, rtol=1e-5)
    with pytest.raises(KVBenchError, match="softcapping or attention sinks"):
        layer_call(attention, q, k, v, softcap=30.0)


# ----------------------------------------------------------------------------- (2) the loss and schedule


def test_loss_is_the_hand_computation():
    teacher = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    student = torch.tensor([[1.0, 0.0], [2.0, 4.0], [0.0, 0.0]])
    gates = torch.tensor([[1.0, 0.5], [0.0, 0.25]])
    loss, distill, reg = est.duo_loss(teacher, student, gates, 0.1)
    # per token mean over d of the squared difference: 2, 0.5, 0.5 -> sum 3 over 3 tokens; mean |alpha| 1.75 / 4
    assert distill.item() == pytest.approx(1.0) and reg.item() == pytest.approx(0.4375)
    assert loss.item() == pytest.approx(1.0 + 0.1 * 0.4375)
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    gates = torch.rand(3, 2, generator=g)
    by_hand = sum(sum((teacher[t, d].item() - student[t, d].item()) ** 2 for d in range(5)) / 5
                  for t in range(7)) / 7 + 0.05 * sum(abs(x) for x in gates.flatten().tolist()) / 6
    assert est.duo_loss(teacher, student, gates, 0.05)[0].item() == pytest.approx(by_hand, rel=1e-6)


def test_lr_schedule_is_the_reference_lambda():
    def reference(step, n):  # train.py:346-353 (n >= 5)
        return min(1, max((step + 1) / (n // 5), 0.1), max((n - step) / (n // 5), 0.1))

    for n in (5, 10, 2000):
        assert [est.lr_factor(s, n) for s in range(n)] == [reference(s, n) for s in range(n)]
    assert est.lr_factor(0, 1) == 1.0 and est.lr_factor(0, 2000) == 0.1 and est.lr_factor(399, 2000) == 1.0


# ----------------------------------------------------------------------------- the data


SHORT = {"num_passkeys": 1, "ctx_min": 300, "ctx_max": 320}  # samples of about 340 tokens


def small_data(tokenizer, seed=42, **overrides):
    settings = est.DataSettings(**{"num_passkeys": 2, "passkey_length": 3, "ctx_min": 400, "ctx_max": 560,
                                   "ctx_intervals": 5, "depth_intervals": 20, "buffer": 0, **overrides})
    data = est.PasskeyData(tokenizer, settings, torch.Generator().manual_seed(seed))
    data.set_haystack(est.haystack_ids(tokenizer, est.read_texts(est.HAYSTACK), settings.ctx_max))
    return data


def test_passkey_samples_follow_the_reference_layout(tiny_gqa):
    _, tokenizer = tiny_gqa
    data = small_data(tokenizer)
    assert data.lengths.tolist() == [400, 440, 480, 520, 560] and len(data.haystack) == data.room
    assert sorted(data.epoch()) == [400, 440, 480, 520, 560]
    ids, first = data.sample(400)
    assert ids.shape[0] % 16 == 0 and ids[0].item() == tokenizer.bos_token_id
    text, qa = tokenizer.decode(ids[1:first]), tokenizer.decode(ids[first:])  # ids[0]: BOS
    keys = [line.split("Passkey: ")[1] for line in qa.split("\n\n") if line]
    assert len(keys) == 2 and all(len(key.split()) == 3 and set(key.split()) <= set(est.PASSKEY_ALPHABET)
                                  for key in keys)
    assert qa == "".join(f"Based on the content of the book, what is the {o} passkey to the vault?\nPasskey: {key}\n\n"
                         for o, key in zip(("first", "second"), keys))
    assert text.startswith("<|im_start|> This is a very long story book: <book> ") and text.endswith(" </book>.\n\n")
    spots = [text.index(f"\n\nRemeber this sequence of words, it's the {o} passkey to the vault: {key}\n\n")
             for o, key in zip(("first", "second"), keys)]
    assert spots[0] < spots[1]  # sorted depths
    body = text[len("<|im_start|> This is a very long story book: <book> "):-len(" </book>.\n\n")]
    for o, key in zip(("first", "second"), keys):
        body = body.replace(f"\n\nRemeber this sequence of words, it's the {o} passkey to the vault: {key}\n\n", "")
    hay = tokenizer.decode(data.haystack[:400])  # the first 400 haystack tokens, then 1..16 of its last as a pad
    assert body.startswith(hay) and 1 <= len(body) - len(hay) <= 16
    assert hay + tokenizer.decode(data.haystack[-(len(body) - len(hay)):]) == body


def test_haystack_files(tmp_path, tiny_gqa):
    _, tokenizer = tiny_gqa
    rows = ["First text. ", "Second text, a bit longer. ", "Third."]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    import pandas as pd

    pd.DataFrame({"body": rows}).to_parquet(tmp_path / "h.parquet")
    (tmp_path / "h.txt").write_text("".join(rows))
    whole = tokenizer.encode("".join(rows), add_special_tokens=False)
    for name, field in (("h.jsonl", "text"), ("h.parquet", "body"), ("h.txt", "text")):
        assert est.haystack_ids(tokenizer, est.read_texts(tmp_path / name, field), 10**6) == whole
    assert est.haystack_ids(tokenizer, est.read_texts(tmp_path / "h.jsonl"), 20) == whole[:20]
    with pytest.raises(KVBenchError, match="has no 'body' field; set --text-field"):
        list(est.read_texts(tmp_path / "h.jsonl", "body"))


# ----------------------------------------------------------------------------- (4) the gates' direction


def test_teacher_is_the_model_and_the_student_at_one_is_the_teacher(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(4, 200, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # kvbench's attention, no cache
    attention = est.DuoTraining(torch.nn.Parameter(torch.ones(2, 2)), 2, 4, None, 16)
    with est.training(model, attention):
        loss, distill, reg = est.step_loss(model, attention, ids, 0, 0.05)
        teacher = torch.stack([attention.full[i] for i in range(2)])
        with torch.no_grad():
            attention.teacher = True
            again = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(again, own, atol=1e-5, rtol=1e-5)
    assert distill.item() == 0.0 and reg.item() == 1.0 and loss.item() == pytest.approx(0.05)
    assert teacher.shape == (2, 1, 50, 4, 16)


def test_gradient_matches_finite_differences_and_the_first_step_follows_it(tiny_gqa):
    model, _ = tiny_gqa
    model = copy.deepcopy(model).double()
    ids = torch.randint(4, 200, (1, 96), generator=torch.Generator().manual_seed(3))
    first = 70  # the last 26 tokens labelled
    data = SimpleNamespace(epoch=lambda: [96], sample=lambda length: (ids[0], first))  # PasskeyData's interface
    settings = est.TrainSettings(steps=1, lr=0.02, reg_weight=0.05, initial_value=0.5, sink_size=2, recent_size=8,
                                 streaming="sdpa", query_block=64, checkpointing=True)
    start = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    gates = torch.nn.Parameter(start.clone())
    attention = est.DuoTraining(gates, 2, 8, None, 64)

    def loss_at(values):
        with torch.no_grad():
            gates.copy_(values)
        with est.training(model, attention):
            return est.step_loss(model, attention, ids, first, 0.05)[0]

    with est.training(model, attention, checkpointing=True):
        loss = est.step_loss(model, attention, ids, first, 0.05)[0]
        loss.backward()
    grad = gates.grad.clone()
    eps = 1e-3  # central differences; transformers' RMSNorm computes in float32 even in a float64 model
    for i, h in ((0, 1), (1, 0)):  # a gate of each layer
        bump = torch.zeros(2, 2, dtype=torch.float64)
        bump[i, h] = eps
        numeric = (loss_at(start + bump).item() - loss_at(start - bump).item()) / (2 * eps)
        assert grad[i, h].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)
    assert (grad.abs() > 1e-4).all()
    flags = [p.requires_grad for p in model.parameters()]
    trained, summary = est.train_gates(model, data, settings)
    assert summary["steps"] == 1
    # AdamW's first step moves each gate by lr (lr factor 1 at step 0 of 1) against its gradient's sign
    torch.testing.assert_close(trained.double(), (start - 0.02 * grad.sign()).double(), atol=1e-6, rtol=0)
    assert [p.requires_grad for p in model.parameters()] == flags  # the weights' flags are restored


def test_gates_stay_at_one_without_reg_and_fall_with_a_large_reg(tiny_gqa):
    model, tokenizer = tiny_gqa
    base = est.TrainSettings(steps=3, lr=0.02, sink_size=2, recent_size=8, streaming="blocksparse", block_size=4,
                             checkpointing=False)
    # at alpha = 1 the student is the teacher: the distillation term is 0 with zero gradient, only reg moves them
    stay, summary = est.train_gates(model, small_data(tokenizer, **SHORT),
                                    est.TrainSettings(**{**vars(base), "reg_weight": 0.0}))
    assert stay.tolist() == [[1.0, 1.0], [1.0, 1.0]] and summary["distill_loss"] == 0.0
    # a large reg outweighs the distillation: every AdamW step takes lr x the schedule's factor off every gate
    fall, summary = est.train_gates(model, small_data(tokenizer, **SHORT),
                                    est.TrainSettings(**{**vars(base), "reg_weight": 10.0}))
    drop = 0.02 * sum(est.lr_factor(s, 3) for s in range(3))
    torch.testing.assert_close(fall, torch.full((2, 2), 1 - drop), atol=1e-4, rtol=0)
    assert 0 < summary["distill_loss"] and summary["reg_loss"] == pytest.approx(1 - 0.02 * 2, abs=1e-4)
    # the model is as it was: kvbench's attention, no gradient flags changed, eval mode
    assert model.config._attn_implementation == "kvbench" and not model.training


# ----------------------------------------------------------------------------- (3) the script's files in kvbench


def run_script(out, *extra):
    return est.main(["--model", "tiny-random", "--device", "cpu", "--steps", "4", "--ctx-min", "560", "--ctx-max",
                     "600", "--ctx-intervals", "3", "--num-passkeys", "1", "--passkey-length", "3", "--buffer", "0",
                     "--sink-size", "2", "--recent-size", "6", "--block-size", "4", "--reg", "2", "--out", str(out),
                     *extra])


def test_script_writes_patterns_the_method_runs_with(tmp_path, tiny_gqa, capsys):
    out = tmp_path / "duo" / "tiny-random"
    assert run_script(out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "full_attention_heads.tsv"]
    rows = (out / "full_attention_heads.tsv").read_text().splitlines()
    assert len(rows) == 2 and all(len(row.split("\t")) == 2 for row in rows)  # a row per layer, a column per KV head
    alpha, config = load_patterns(out)
    assert alpha.shape == (2, 2) and (alpha < 1).all() and (alpha >= 0).all()  # reg 2 pulled every gate down
    assert np.loadtxt(out / "full_attention_heads.tsv", delimiter="\t").tolist() == alpha.tolist()  # saved clipped
    assert (config["sink_size"], config["recent_size"], config["lr"], config["reg_weight"]) == (2, 6, 0.02, 2.0)
    assert config["streaming_attn_implementation"] == "blocksparse" and config["num_steps"] == 4
    method = build({"name": "duo_attention", "patterns": str(out)})
    assert (method.sink_size, method.recent_size) == (2, 6)
    with pytest.raises(KVBenchError, match=r"not found: .*scripts/estimate_duo_patterns.py --model"):
        build({"name": "duo_attention", "patterns": str(tmp_path / "none")})  # the method's error names the script
    model, _ = tiny_gqa  # the same weights as tiny-random
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    session = Session(model, method, Budget(tokens=24), reserve=4)
    session.prefill(prompt)
    # C = 24, L = 40, W = 8, N = 4: n_s = ceil(4 * 16 / 32) = 2 streaming heads, the two lowest alpha
    streaming = streaming_heads(alpha, streaming_count(4, 40, 24, 8))
    assert int(streaming.sum()) == 2
    kept = [[len(x) for x in ragged_kept(layer)[0]] for layer in session.cache.layers]
    assert kept == [[8 if s else 40 for s in row] for row in streaming.tolist()]
    assert len(Session(model, method, Budget(tokens=24), reserve=4).generate(prompt, 4).tokens[0]) == 4
    # a second run does not replace the patterns unless asked; --overwrite replaces both files whole
    before = (out / "full_attention_heads.tsv").read_text()
    assert run_script(out) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (out / "full_attention_heads.tsv").read_text() == before
    assert run_script(out, "--overwrite", "--reg", "0") == 0
    assert load_patterns(out)[0].tolist() == [[1.0, 1.0], [1.0, 1.0]] and load_patterns(out)[1]["reg_weight"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "full_attention_heads.tsv"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    cases = [(["--haystack", str(tmp_path / "none.txt")], "--haystack .*none.txt not found"),
             (["--num-passkeys", "21"], "--num-passkeys 21 must be in 1..20"),
             (["--ctx-min", "700"], "--ctx-min 700 is above --ctx-max 600: lower --ctx-min"),
             (["--ctx-max", "100", "--ctx-min", "50"], "leaves no haystack .* raise --ctx-max")]
    for extra, message in cases:
        assert run_script(out, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kvbench: error: ")
        assert re.search(message, err[0]), err[0]
    short = tmp_path / "short.txt"
    short.write_text("Too short a book. " * 5)
    assert run_script(out, "--haystack", str(short)) == 2
    assert "pass a longer text" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".x*"))


def test_writes_are_atomic(tmp_path, monkeypatch):
    out = tmp_path / "p"
    est.write_patterns(out, np.array([[0.5, 1.2]]), {"sink_size": 1, "recent_size": 2})
    assert load_patterns(out)[0].tolist() == [[0.5, 1.0]]
    before = {p.name: p.read_text() for p in out.iterdir()}

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(est.os, "replace", broken)
    with pytest.raises(OSError):
        est.write_patterns(out, np.array([[0.1, 0.2]]), {"sink_size": 3, "recent_size": 4}, overwrite=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # old files whole, no temporary left
    monkeypatch.setattr(est.os, "rename", broken)
    with pytest.raises(OSError):
        est.write_patterns(tmp_path / "q", np.array([[0.1]]), {"sink_size": 3, "recent_size": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
