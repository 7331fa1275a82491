"""DuoAttention — Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", arXiv:2410.10819 (github.com/mit-han-lab/duo-attention); reference code: NVIDIA kvpress
`DuoAttentionPress` (kvpress/presses/duo_attention_press.py, commit 8bb29b9).

Every KV head is a retrieval head (it keeps the whole cache) or a streaming head (it keeps the first
`sink_size` and the last `recent_size` tokens of the prompt). Which heads stream comes from a per-head
value alpha in [0, 1] trained offline by DuoAttention (its published attention patterns):

    alpha       = clip(full_attention_heads.tsv, 0, 1)            (layers, kv_heads), as duo_attn.utils
                                                                   .load_attn_pattern and kvpress
    n_s         = round(layers * kv_heads * head_compression_ratio)   (kvpress; Python round)
    streaming   = the n_s heads of lowest alpha over all layers    (kvpress: np.argsort(alpha, axis=None)[:n_s])
    a streaming head keeps positions j < S or j >= L - R            (S = sink_size, R = recent_size)

Pattern files: DuoAttention's published format, `attn_patterns/<model>/<run>/full_attention_heads.tsv`
(tab-separated, one row per layer, one column per KV head) beside the training `config.json`, whose
`sink_size` and `recent_size` kvpress reads (128 and 256 in every published run). `method.patterns` is
the folder or the .tsv (config.json is then read from the same folder when present); `sink_size` and
`recent_size` override it. kvpress downloads the files from GitHub at run time (PATTERNS below: the
published models); kvbench runs offline and reads a local copy. No pattern is published for other
models: `scripts/estimate_duo_patterns.py --model <model>` trains one (DuoAttention's training, on a GPU)
into results/duo_patterns/<model>. A file for another model (layers x KV heads) stops the run at its first
prefill, before any record, with one line (`check_model` does the same for a caller that has the model
before any sample).

What kvbench's budget means here (kvpress has no token budget: `head_compression_ratio` fixes n_s and
the memory follows). kvbench's C is, as for every method, the mean tokens kept per KV head per layer
over the prompt, so DuoAttention is compared at the same memory as the others: for a prompt of L > C
tokens and N = layers x kv_heads heads, the fewest streaming heads that meet the mean,

    n_s = ceil(N (L - C) / (L - W)),   W = S + R      (mean kept = ((N - n_s) L + n_s W) / N <= C)

chosen by kvpress's rule above (lowest alpha first). A budget below W cannot be met (even all-streaming
keeps W per head): one line asks for smaller sink/recent sizes. `head_compression_ratio` set: kvpress's
fixed fraction instead, the budget is then not used (the run label says `-hcr<ratio>`, prompts longer
than W are compressed, as kvpress masks only then).

Carried over from kvpress: alpha clipped to [0, 1]; the streaming heads are the lowest alpha over all
layers at once (not per layer); round() of the head count; per KV head (a GQA group shares its KV
head's choice); sink and recent counted on the prompt, and a prompt no longer than S + R untouched;
prefill only: decoded tokens join every head (kvpress masks only the prompt's middle tokens too).

Deliberate differences:
- memory: kvpress masks the dropped keys with a fake key (memory not freed); kvbench moves the layer to
  the ragged store, so streaming heads really hold S + R tokens (same attention output);
- ties in alpha: kvpress's np.argsort is unstable (quicksort); kvbench sorts stably, the lower
  (layer, head) index streaming first (`tests/unit/test_duo_attention.py` checks kvpress's order on
  distinct values);
- the budget (above): kvpress's head_compression_ratio is an option, the default derives it from C;
- DuoAttention's own deployment keeps streaming heads at S + R while decoding (a rolling window);
  kvpress, and kvbench, append decoded tokens to every head and never evict;
- DuoAttention's `sparsify_attention_heads(threshold=0.5)` rule (alpha >= 0.5 is retrieval) is not
  offered: it crashes there without a sparsity (`None >= 1`), and kvpress does not use it;
- on a model with sliding-window layers those layers keep their window (as for every per-head
  method) and still count in N.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from kvbench.engine.budget import Budget
from kvbench.engine.types import ModelShape
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method

PATTERN_FILE = "full_attention_heads.tsv"
SOURCE = "https://github.com/mit-han-lab/duo-attention/tree/main/attn_patterns"
# the published patterns kvpress loads (its PATTERNS_DICT): model -> folder under attn_patterns/
PATTERNS = {
    "togethercomputer/Llama-2-7B-32K-Instruct": "Llama-2-7B-32K-Instruct/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10",
    "gradientai/Llama-3-8B-Instruct-Gradient-1048k":
        "Llama-3-8B-Instruct-Gradient-1048k/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10",
    "gradientai/Llama-3-8B-Instruct-Gradient-4194k":
        "Llama-3-8B-Instruct-Gradient-4194k/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "Meta-Llama-3.1-8B-Instruct/lr=0.02-reg=0.05-ctx=1000_128000-multi_passkey10",
    "mistralai/Mistral-7B-Instruct-v0.2": "Mistral-7B-Instruct-v0.2/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10",
    "mistralai/Mistral-7B-Instruct-v0.3": "Mistral-7B-Instruct-v0.3/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10",
}


def load_patterns(path: str | Path) -> tuple[np.ndarray, dict]:
    """(alpha (layers, kv_heads) float64 clipped to [0, 1], the run's config.json or {}) from a pattern
    folder or its full_attention_heads.tsv."""
    path = Path(path)
    tsv = path / PATTERN_FILE if path.is_dir() else path
    if not tsv.is_file():
        raise KVBenchError(
            f"DuoAttention pattern file {tsv} not found: copy full_attention_heads.tsv and config.json of the "
            f"model from {SOURCE} (published for {', '.join(sorted(PATTERNS))}) into that folder, or set "
            "method.patterns=PATH; for another model estimate them with "
            "`python scripts/estimate_duo_patterns.py --model <model>`"
        )
    try:
        alpha = np.loadtxt(tsv, dtype=float, delimiter="\t", ndmin=2)
    except ValueError as err:
        raise KVBenchError(f"DuoAttention pattern file {tsv} is not a tab-separated table of numbers ({err})") from None
    if alpha.size == 0 or not np.isfinite(alpha).all():
        raise KVBenchError(f"DuoAttention pattern file {tsv} is empty or holds non-finite values")
    config_path = tsv.parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return np.clip(alpha, 0, 1), config


def streaming_heads(alpha: np.ndarray, n_streaming: int) -> torch.Tensor:
    """Boolean (layers, kv_heads): the `n_streaming` heads of lowest alpha over all layers (kvpress's
    argsort over the flattened array; stable here: among equal alpha the lower flat index streams)."""
    mask = np.zeros(alpha.size, dtype=bool)
    if n_streaming > 0:
        mask[np.argsort(alpha, axis=None, kind="stable")[:n_streaming]] = True
    return torch.from_numpy(mask.reshape(alpha.shape))


def streaming_count(heads: int, prompt_len: int, budget: int, window: int) -> int:
    """The fewest streaming heads out of `heads` whose mean kept tokens ((heads - n) L + n W) / heads is at
    most `budget` (0 when the prompt fits it)."""
    if prompt_len <= budget:
        return 0
    return min(heads, math.ceil(heads * (prompt_len - budget) / (prompt_len - window)))


@dataclass
class DuoAttention(Method):
    patterns: str | None = None  # pattern folder (full_attention_heads.tsv + config.json), or the .tsv itself
    sink_size: int | None = None  # None: the pattern's config.json (128 in the published runs)
    recent_size: int | None = None  # None: the pattern's config.json (256 in the published runs)
    head_compression_ratio: float | None = None  # kvpress's fixed fraction of streaming heads; None: from the budget

    name: ClassVar[str] = "duo_attention"
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "none at run time (patterns trained offline by DuoAttention); ragged store"
    reference: ClassVar[str] = "arXiv:2410.10819; mit-han-lab/duo-attention; kvpress DuoAttentionPress"
    per_head: ClassVar[bool] = True
    adapts: ClassVar[bool] = False  # its per-head budgets are its own
    _alpha: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (n_streaming, device) -> mask

    def __post_init__(self):
        super().__post_init__()
        if self.positions != "original":
            raise KVBenchError("duo_attention keeps a ragged store after the prompt: use method.positions=original")
        if self.sinks:
            raise KVBenchError("duo_attention protects its own sinks: set method.sink_size, not method.sinks")
        if not self.patterns:
            raise KVBenchError(
                f"duo_attention needs DuoAttention's attention patterns: method.patterns=PATH (a folder with "
                f"full_attention_heads.tsv and config.json, published at {SOURCE})"
            )
        if self.head_compression_ratio is not None and not 0 <= self.head_compression_ratio <= 1:
            raise KVBenchError(f"method.head_compression_ratio={self.head_compression_ratio} must be in [0, 1]")
        self._alpha, config = load_patterns(self.patterns)
        for setting in ("sink_size", "recent_size"):
            if getattr(self, setting) is None:
                if setting not in config:
                    raise KVBenchError(f"no config.json with {setting} beside {self.patterns}: set method.{setting}=N")
                setattr(self, setting, int(config[setting]))
            if getattr(self, setting) < 0:
                raise KVBenchError(f"method.{setting}={getattr(self, setting)} must be >= 0")

    @property
    def label(self) -> str:
        label = self.name
        if self.head_compression_ratio is not None:
            label += f"-hcr{self.head_compression_ratio:g}"
        return label

    @property
    def window(self) -> int:
        """W: the tokens a streaming head keeps."""
        return self.sink_size + self.recent_size

    def check_model(self, shape: ModelShape) -> None:
        """One line when the patterns are for another model (layers x KV heads)."""
        layers, heads = self._alpha.shape
        if (layers, heads) != (shape.num_layers, shape.kv_heads):
            raise KVBenchError(
                f"DuoAttention patterns {self.patterns} cover {layers} layers x {heads} KV heads but the model has "
                f"{shape.num_layers} x {shape.kv_heads}: use the patterns of this model ({SOURCE})"
            )

    def allocate(self, budget: Budget, prompt_len: int | None) -> tuple[int | None, int, int]:
        if self.head_compression_ratio is not None:  # kvpress: the budget is not a parameter
            return self.window, self.sink_size, self.recent_size
        total = budget.resolve(prompt_len)
        if total is None:
            return None, 0, 0
        if total < self.window and (prompt_len is None or prompt_len > total):
            raise KVBenchError(
                f"budget {total} is below DuoAttention's streaming window sink_size + recent_size = "
                f"{self.sink_size} + {self.recent_size}: raise the budget or lower method.sink_size/recent_size"
            )
        return total, self.sink_size, self.recent_size

    def split(self, budget: int) -> tuple[int, int]:
        return min(self.sink_size, budget), min(self.recent_size, max(0, budget - self.sink_size))

    def n_streaming(self, prompt_len: int, budget: int) -> int:
        heads = self._alpha.size
        if self.head_compression_ratio is not None:
            return round(heads * self.head_compression_ratio)  # kvpress, Python round
        return streaming_count(heads, prompt_len, budget, self.window)

    def prefill_scores(self, layer, stats):
        # no ranking: sinks and recent window are protected by the engine, the rest ties (head_budgets decides)
        return torch.zeros(layer.view("pos").shape, dtype=torch.float32, device=layer.view("pos").device)

    def head_budgets(self, layer_idx: int, scores: torch.Tensor, budget: int, shape: ModelShape) -> torch.Tensor:
        """Tokens kept per (batch, KV head): the prompt in a retrieval head, S + R in a streaming head."""
        self.check_model(shape)
        n = scores.shape[-1]
        key = (self.n_streaming(n, budget), scores.device)
        if key not in self._masks:
            self._masks[key] = streaming_heads(self._alpha, key[0]).to(scores.device)
        streaming = self._masks[key][layer_idx]
        counts = torch.where(streaming, min(n, self.window), n)
        return counts.expand(scores.shape[0], -1).to(torch.long)
