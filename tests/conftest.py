import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from kvbench.models import load  # noqa: E402

TINY = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


from tests.helpers import HEAD_SCORES  # noqa: E402


def method_config(path) -> dict:
    """A configs/method/*.yaml as a dict; headkv gets the tiny model's score file, duo_attention its pattern,
    qfilter its filters."""
    cfg = yaml.safe_load(Path(path).read_text())
    if cfg["name"] == "headkv":
        cfg["head_scores"] = str(HEAD_SCORES)
    if cfg["name"] == "duo_attention":  # a pattern for the tiny model (tests/fixtures/duo_attention/tiny)
        cfg["patterns"] = str(Path(__file__).resolve().parent / "fixtures" / "duo_attention" / "tiny")
    if cfg.get("quant", "none") != "none":  # KIVI groups must divide the tiny models' head dim (16)
        cfg.update(quant_group=8, quant_residual=16)
    if cfg["name"] == "qfilter":  # the tiny GQA model's filters (scripts/estimate_qfilters.py)
        cfg["filters"] = str(Path(__file__).resolve().parent / "fixtures" / "qfilter" / "tiny")
    return cfg


def tiny_cfg(**tiny_overrides):
    return {
        "name": "tiny",
        "tiny": {**TINY, **tiny_overrides},
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": "sdpa",
        "seed": 0,
    }


@pytest.fixture(scope="session")
def tiny_gqa():
    torch.set_num_threads(2)
    return load(tiny_cfg())


@pytest.fixture(scope="session")
def tiny_mha():
    return load(tiny_cfg(num_key_value_heads=4))
