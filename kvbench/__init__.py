"""kvbench: a reproducible benchmark harness for KV-cache compression in decoder LLMs.

The public API, imported on first use so `import kvbench` stays light:

    kvbench.compress(model, method="snapkv", budget=0.5)   # context manager yielding a Session
    kvbench.Session(model, policy, budget)                 # prefill() / step(): the engine's driver
    kvbench.Budget, kvbench.methods.build, kvbench.methods.REGISTRY
    kvbench.evaluate(model="tiny", method="h2o", budget=128, task="passkey")   # one whole run
"""

__version__ = "0.1.0"

_PUBLIC = {
    "compress": "kvbench.api",
    "evaluate": "kvbench.api",
    "Session": "kvbench.engine",
    "Budget": "kvbench.engine",
    "CompressedCache": "kvbench.engine",
    "KVBenchError": "kvbench.errors",
}


_SUBPACKAGES = ("engine", "methods")  # kvbench.methods.build / REGISTRY without a second import


def __getattr__(name: str):
    import importlib

    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"kvbench.{name}")
    raise AttributeError(f"module 'kvbench' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC, *_SUBPACKAGES])
