"""Head-importance score files in HeadKV's published format (read by HeadKV's per-head budgets).

Format: one JSON object; keys "layer-head" for every query head ("0-0", "0-1", ...),
values lists of per-run scores. A head's importance is the mean of its list (0 when
empty). The files HeadKV publishes for Llama-3-8B-Instruct and Mistral-7B-Instruct
load as they are; `scripts/estimate_head_scores.py` (papers/head_scores.py) writes the same format.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvbench.errors import KVBenchError

KEY = re.compile(r"^(\d+)-(\d+)$")


def load_head_scores(path: str | Path) -> torch.Tensor:
    """Importance (layers, query_heads) float64: the mean of each head's score list."""
    path = Path(path)
    if not path.is_file():
        raise KVBenchError(
            f"head-score file {path} not found; set method.head_scores=PATH "
            "(make one with scripts/estimate_head_scores.py)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KVBenchError(f"head-score file {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise KVBenchError(f"head-score file {path} must be one JSON object of \"layer-head\": [scores]")
    means = {}
    for key, scores in data.items():
        match = KEY.match(str(key))
        if match is None or not isinstance(scores, list):
            raise KVBenchError(f"head-score file {path}: entry {key!r} is not \"layer-head\": [scores]")
        # np.mean as HeadKV's code takes it (its summation order); an empty list scores 0 (NaN there)
        means[int(match[1]), int(match[2])] = float(np.mean(scores)) if scores else 0.0
    layers = 1 + max(layer for layer, _ in means)
    heads = 1 + max(head for _, head in means)
    missing = [f"{layer}-{head}" for layer in range(layers) for head in range(heads) if (layer, head) not in means]
    if missing:
        raise KVBenchError(f"head-score file {path} lacks heads {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    importance = torch.zeros(layers, heads, dtype=torch.float64)
    for (layer, head), value in means.items():
        importance[layer, head] = value
    return importance


def write_head_scores(path: str | Path, scores: dict[tuple[int, int], list[float]]) -> None:
    """Write {(layer, head): [per-run scores]} in the published format, atomically (temp file + rename)."""
    path = Path(path)
    data = {f"{layer}-{head}": [float(s) for s in values] for (layer, head), values in sorted(scores.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
