"""kvbench: a reproducible benchmark harness for KV-cache compression in decoder LLMs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`kvbench.evaluate` (kvbench/api.py), imported on first use so `import kvbench` stays light."""
    if name == "evaluate":
        from kvbench.api import evaluate

        return evaluate
    raise AttributeError(f"module 'kvbench' has no attribute {name!r}")


class KVBenchError(Exception):
    """A mistake the user can fix (bad config, missing file). Printed as one line, no traceback."""


def error_exit(err: Exception) -> int:
    """A command line's way out of a KVBenchError: one line on stderr, exit status 2."""
    import sys

    print(f"kvbench: error: {err}", file=sys.stderr)
    return 2


def build_dataclass(cls, params: dict, kind: str):
    """Instantiate a settings dataclass from a config mapping; unknown keys are one clear error."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise KVBenchError(
            f"{kind} has no setting {', '.join(unknown)}; its settings are: {', '.join(sorted(fields))}"
        )
    return cls(**params)
