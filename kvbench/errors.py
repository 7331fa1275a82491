"""The one exception a user's mistake raises, and how command lines report it."""

from __future__ import annotations

import dataclasses
import sys


class KVBenchError(Exception):
    """A mistake the user can fix (bad config, missing file). Printed as one line, no traceback."""


def error_exit(err: Exception) -> int:
    """A command line's way out of a KVBenchError: one line on stderr, exit status 2."""
    print(f"kvbench: error: {err}", file=sys.stderr)
    return 2


def build_dataclass(cls, params: dict, kind: str):
    """Instantiate a settings dataclass from a config mapping; unknown keys are one clear error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise KVBenchError(
            f"{kind} has no setting {', '.join(unknown)}; its settings are: {', '.join(sorted(fields))}"
        )
    return cls(**params)
