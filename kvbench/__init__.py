"""kvbench: a reproducible benchmark harness for KV-cache compression in decoder LLMs."""

__version__ = "0.1.0"


class KVBenchError(Exception):
    """A mistake the user can fix (bad config, missing file). Printed as one line, no traceback."""
