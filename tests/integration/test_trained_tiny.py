"""The shipped trained tiny model (model=tiny): it retrieves a passkey with a full cache, and a cache
too small to hold the needle loses it. Behaviour, not shapes; skipped if the asset is missing."""

import pytest
import torch

from kvbench.engine import Budget
from kvbench.methods import build
from kvbench.models import load
from kvbench.models.generator import Generator
from kvbench.resources import ASSETS_DIR
from kvbench.tasks.synthetic import Passkey

pytestmark = pytest.mark.skipif(not (ASSETS_DIR / "tiny-llama" / "config.json").exists(),
                                reason="the trained tiny model is not shipped")


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(2)
    return load({"name": "tiny", "asset": "tiny-llama", "device": "cpu", "dtype": "float32"})


def accuracy(model, tok, method, budget, task):
    generator = Generator(model, tok, build(method), budget)
    records = [task.evaluate(s, generator) for s in task.samples(tok)]
    return sum(r["score"] for r in records) / len(records)


def test_full_cache_retrieves_the_passkey_at_1024_tokens(trained):
    model, tok = trained
    task = Passkey(num_samples=12, context_tokens=1024, seed=2024)
    assert accuracy(model, tok, {"name": "full"}, None, task) >= 0.9


def test_a_recent_window_loses_a_needle_far_from_the_end(trained):
    model, tok = trained
    far = Passkey(num_samples=12, context_tokens=1024, depth_max=0.6, seed=7)
    assert accuracy(model, tok, {"name": "full"}, None, far) >= 0.9
    assert accuracy(model, tok, {"name": "streamingllm"}, Budget(tokens=64), far) <= 0.1
