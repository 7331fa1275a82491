"""Checks a run makes before any work, so a mistake is one line (rc 2) and leaves nothing on disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kvbench.errors import KVBenchError


def check_writable(folder: Path) -> None:
    """The run folder, or the nearest folder above it that exists, must be writable (before the model loads)."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK) or not _can_create_in(existing):
        raise KVBenchError(
            f"cannot write the run folder {folder}: {existing} is not a writable folder; "
            "set paths.results=DIR to a folder you can write"
        )


def _can_create_in(folder: Path) -> bool:
    """A file can be made there (a read-only mount refuses even root); the probe is removed at once."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_task_method(task, method) -> None:
    """A task that cannot run a method says so before the run folder exists (e.g. snapkv on perplexity)."""
    check = getattr(task, "check_method", None)
    if check is not None:
        check(method)


def check_context(task, method, model) -> None:
    """A synthetic prompt longer than the model's positions would score 0 silently; stop instead.

    Runs that keep positions inside the cache (`method.positions=shifted` with a compressing method)
    never exceed the budget's positions, so they may go past the model's context."""
    context = getattr(task, "context_tokens", None)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is None or limit is None:
        return
    if method.compresses and getattr(method, "positions", "original") == "shifted":
        return
    needed = int(context) + int(getattr(task, "max_new_tokens", 0))
    if needed > limit:
        raise KVBenchError(
            f"task.context_tokens={context} (+{needed - int(context)} new tokens) is beyond the model's "
            f"{limit} positions (max_position_embeddings); set task.context_tokens<={limit - (needed - int(context))}"
        )
