"""Compression methods: one small dataclass per file, and a registry name -> class."""

from __future__ import annotations

from kvbench.errors import KVBenchError, build_dataclass
from kvbench.methods.ada_snapkv import AdaSnapKV
from kvbench.methods.base import Method
from kvbench.methods.cake import CAKE
from kvbench.methods.duo_attention import DuoAttention
from kvbench.methods.expected_attention import ExpectedAttention
from kvbench.methods.full import Full
from kvbench.methods.h2o import H2O
from kvbench.methods.headkv import HeadKV
from kvbench.methods.keydiff import KeyDiff
from kvbench.methods.knorm import Knorm
from kvbench.methods.kvzip import KVzip
from kvbench.methods.lagkv import LagKV
from kvbench.methods.pyramidkv import PyramidKV
from kvbench.methods.qfilter import QFilter
from kvbench.methods.randomkv import Random
from kvbench.methods.simlayerkv import SimLayerKV
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.methods.tova import TOVA
from kvbench.methods.vatp import VATP, Scissorhands
from kvbench.methods.weightedkv import WeightedKV

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (Full, StreamingLLM, H2O, VATP, Scissorhands, SnapKV, TOVA, WeightedKV, HeadKV, AdaSnapKV, PyramidKV,
                Knorm, KeyDiff, LagKV, Random, ExpectedAttention, DuoAttention, QFilter, SimLayerKV, CAKE, KVzip)
}


def build(cfg) -> Method:
    """Build a method from a `configs/method/*.yaml` mapping: `name` plus the dataclass fields."""
    params = dict(cfg)
    name = params.pop("name", None)
    if name not in REGISTRY:
        raise KVBenchError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return build_dataclass(REGISTRY[name], params, f"method '{name}'")


# settings that compose with any scorer, by the setting (before any "="): (is it on?, extra cost, reference),
# for `kvbench list methods`
WRAPPERS = {
    "heads": (lambda v: v == "ada", "Ada-KV head budgets, ragged store", "arXiv:2407.11550; kvpress AdaKVPress"),
    "chunk": (bool, "chunk scores (ChunkKV)", "arXiv:2502.00299; kvpress ChunkKVPress"),
    "critical": (bool, "||v W_o||_1 per query head at the prompt (CriticalKV)", "arXiv:2502.03805; kvpress CriticalKVPress"),
    "layers=pyramid": (lambda v: v == "pyramid", "PyramidKV layer budgets", "arXiv:2406.02069"),
    "layers=cake": (lambda v: v == "cake", "CAKE layer budgets from the attention rows of the last cake_window "
                    "queries; each layer's scores kept during the prompt, earlier layers cut again",
                    "arXiv:2503.12491; antgroup/cakekv"),
    "key_channels": (bool, "key channel scores after the prompt; pruned keys re-expanded every step (ThinK)",
                     "arXiv:2407.21018; kvpress ThinKPress"),
    "quant": (lambda v: v not in (None, "none"), "KV at 2/4 bits, dequantized every step (KIVI)",
              "arXiv:2402.02750; jy-yuan/KIVI"),
}


def info(cfg: dict | str) -> dict:
    """What `kvbench list methods` shows of a method config (or a registry name): the stages it accepts, whether
    it is query-aware, its extra cost, its reference, with those of the settings it turns on (`WRAPPERS`).
    `layers: cake` makes any method query-aware: its layer budgets come from the last queries' attention."""
    cfg = {"name": cfg} if isinstance(cfg, str) else cfg
    cls = REGISTRY[cfg["name"]]
    setting = lambda key: key.partition("=")[0]  # noqa: E731
    on = [facts for key, (active, *facts) in WRAPPERS.items() if setting(key) in cfg and active(cfg[setting(key)])]
    stages = cfg.get("stage", "prefill") if on else "/".join(cls.stages)
    given = lambda items: "; ".join(x for x in items if x and x not in ("none", "—"))  # noqa: E731
    query_aware = cls.query_aware or cfg.get("layers") == "cake"
    return {"stages": stages, "query_aware": query_aware, "cost": given([cls.cost, *(c for c, _ in on)]),
            "reference": given([*(r for _, r in on), cls.reference])}


__all__ = ["Method", "REGISTRY", "build", "info"]
