"""Rows of a dataset from the hub (through `datasets`' cache) or a local parquet file, each with where it came
from, for tasks that read one table of problems (LongBench v2, MATH-500 / AIME)."""

from __future__ import annotations

import os
from pathlib import Path

from kvbench.errors import KVBenchError


def fetch_command(hub_id: str, split: str, out: str | None = None) -> str:
    """The command that puts a hub dataset in the `datasets` cache (online), or writes it to `out` as jsonl."""
    write = f".to_json('{out}')" if out else ""
    return f"HF_HUB_OFFLINE=0 python -c \"import datasets; datasets.load_dataset('{hub_id}', split='{split}'){write}\""


def fetch_rows(hub_id: str, split: str, local: str) -> list[tuple[str, dict]]:
    """(where, row) of a hub dataset, cached by `datasets`; offline and not cached (or not loadable), one line
    naming the fetch command, or `local`, the local file task.data_path may name instead."""
    from datasets import load_dataset

    try:
        data = load_dataset(hub_id, split=split)
    except Exception as err:  # noqa: BLE001 - offline, gated, renamed: one clear line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "not in the datasets cache and HF_HUB_OFFLINE=1" if offline else f"not loadable ({type(err).__name__}: {err})"
        raise KVBenchError(f"{hub_id} (split {split}) is {why}: run `{fetch_command(hub_id, split)}` once online, or set "
                           f"task.data_path to {local}") from None
    return [(f"{hub_id} ({split}) row {i}", row) for i, row in enumerate(data, 1)]


def parquet_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) of a parquet file."""
    import pandas as pd

    return [(f"{path} row {i}", row) for i, row in enumerate(pd.read_parquet(path).to_dict("records"), 1)]
