"""kvbench's engine: the leaf every other layer builds on (imports torch and transformers only).

Public API (documented in docs/api.md, tested as public):

- `install(model, base)`: register kvbench's attention function on a loaded model (sdpa | eager | flash_attention_2);
- `Session(model, policy, budget, reserve)`: the one driver of a compressed generation (prefill, step, generate);
- `Budget(tokens=N)` / `Budget(ratio=r)`: what a policy may keep per head per layer;
- `CompressedCache`: the transformers `Cache` the session owns (`kv_summary()` says what it kept);
- `cache_argument(model, cache)`: the cache under the keyword the installed transformers takes (`cache` or
  `past_key_values`), for calls to the model outside a session;
- the small types a method is written against: `StatsRequest`, `Stats`, `LayerView`, `Victim`, `ModelShape`,
  `Policy`.
"""

from kvbench.engine.attention import install
from kvbench.engine.budget import Budget
from kvbench.engine.cache import CompressedCache
from kvbench.engine.session import Sampling, Session, cache_argument, forward
from kvbench.engine.types import LayerView, ModelShape, Policy, Stats, StatsRequest, Victim

__all__ = ["Budget", "CompressedCache", "LayerView", "ModelShape", "Policy", "Sampling", "Session", "Stats", "StatsRequest",
           "Victim", "cache_argument", "forward", "install"]
