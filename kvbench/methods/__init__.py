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
                Knorm, KeyDiff, LagKV, Random, ExpectedAttention, DuoAttention, QFilter, SimLayerKV, CAKE)
}


def build(cfg) -> Method:
    """Build a method from a `configs/method/*.yaml` mapping: `name` plus the dataclass fields."""
    params = dict(cfg)
    name = params.pop("name", None)
    if name not in REGISTRY:
        raise KVBenchError(f"unknown method '{name}'; choose one of: {', '.join(sorted(REGISTRY))}")
    return build_dataclass(REGISTRY[name], params, f"method '{name}'")


def info(name: str) -> dict:
    """What `kvbench list methods` shows of a method: the stages it accepts, whether it is query-aware, its
    extra cost, its reference."""
    cls = REGISTRY[name]
    return {"stages": "/".join(cls.stages), "query_aware": cls.query_aware, "cost": cls.cost,
            "reference": cls.reference}


__all__ = ["Method", "REGISTRY", "build", "info"]
