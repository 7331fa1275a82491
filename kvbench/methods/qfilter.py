"""Q-Filters — Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression",
arXiv:2503.02812; reference code: NVIDIA kvpress `QFilterPress` (kvpress/presses/qfilter_press.py, commit
8bb29b9). The paper's own filter-estimation code is not public.

Queries of a head concentrate along one direction u (the first right singular vector of the matrix of its
queries after RoPE, oriented so that the mean of q . u is positive), so a key's expected attention logit
is ranked by k . u alone: no attention is needed, and the question plays no part (query-agnostic). Per
layer and KV head a fixed filter f (layers, kv_heads, head_dim), and per cached token

    s_j  = -(f . k_j)        (kvpress's score; k_j as the cache stores it, after RoPE)
    keep = top C by s, per KV head

Filters: kvpress loads `QFilters.from_pretrained(f"nthngdy/{model}_qfilt")` (a PyTorchModelHubMixin repo:
`model.safetensors` holding the parameter `q_filters` and `config.json` with num_layers, num_kv_heads,
kv_head_dim), `model` being the last part of the model's name_or_path with "Meta-Llama" written "Llama"
(not for Llama-3.1-405B). `method.filters` is a folder in that layout (what scripts/estimate_qfilters.py
writes), a .safetensors or .pt file, or a hub repo id read from the local Hugging Face cache only (kvbench
never downloads at run time: `hf download nthngdy/<model>_qfilt` first). Empty: kvpress's repo id from
`method.model_path` (the configs set it to the model's hub id, `${model.path}`).

Sign convention: filters estimated by kvbench (scripts/estimate_qfilters.py) are stored as f = -u (unit
norm), so that kvpress's score -(f . k) = u . k keeps the keys of highest expected logit; the published
filters must follow the same convention for kvpress's score to work, and are used as they are (not
normalised: with `heads: ada` their norms weigh the heads against each other, as in kvpress's AdaKVPress).

Carried over from kvpress: the score -(f . k).sum(-1) computed in the keys' dtype with the filter cast to
it (kvpress: `q_filters.to(model.dtype)`, the keys' dtype); one filter per KV head (a GQA group shares it);
no sinks and no recent window (`method.sinks` adds sinks); the repo id rule above.

Deliberate differences:
- ties: kvpress leaves them to `torch.topk`; kvbench keeps the more recent token;
- memory: kvpress masks pruned keys; kvbench stores only what it keeps;
- loading: kvbench reads a local folder or file, or the local HF cache, never the network (kvpress
  downloads, and lists the published models from the hub when one is missing); a missing file is one line
  naming it and the estimation script;
- shape: filters of another model are one line (kvpress: an indexing or broadcasting error in the forward
  pass, or silent broadcasting): each layer, when scored, checks its KV heads, head_dim and that its index
  is within the filters' layers; `check_model` (called by `heads: ada`) checks the layer count too;
- `stage: decode` ranks the cache by the same score at every step; `heads: ada` shares a layer's budget
  over its heads by these scores (Ada-KV; kvpress: AdaKVPress(QFilterPress())); kvpress compresses the
  prompt only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from kvbench.engine.types import ModelShape
from kvbench.errors import KVBenchError
from kvbench.methods.base import Method

WEIGHTS, CONFIG, KEY = "model.safetensors", "config.json", "q_filters"  # PyTorchModelHubMixin's layout (kvpress)
SCRIPT = "scripts/estimate_qfilters.py"


def kvpress_repo(name_or_path: str) -> str:
    """kvpress's hub repo of a model's filters: `nthngdy/<last part of name_or_path>_qfilt`, Meta-Llama -> Llama
    (Llama-3.1-405B excepted)."""
    name = name_or_path.rstrip("/").split("/")[-1]
    name = name if "Meta-Llama-3.1-405B" in name else name.replace("Meta-Llama", "Llama")
    return f"nthngdy/{name}_qfilt"


def _is_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not source.endswith((".pt", ".safetensors"))


def _read(path: Path) -> torch.Tensor:
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        data = load_file(path)
    if isinstance(data, dict):  # kvpress's 'q_filters', or a file's one tensor
        data = data.get(KEY, next(iter(data.values())) if len(data) == 1 else None)
    if not isinstance(data, torch.Tensor) or data.dim() != 3:
        raise KVBenchError(f"Q-Filters file {path} holds no (layers, kv_heads, head_dim) tensor '{KEY}'")
    return data


def load_filters(source: str) -> torch.Tensor:
    """The filters (layers, kv_heads, head_dim), as stored, from a folder (model.safetensors + config.json), a
    .safetensors/.pt file, or a hub repo id in the local Hugging Face cache."""
    path = Path(source).expanduser()
    if not path.exists() and _is_repo_id(source):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, WEIGHTS, local_files_only=True))
        except (OSError, ValueError):
            raise KVBenchError(
                f"Q-Filters {source} are not in the local Hugging Face cache (kvbench reads it offline): "
                f"`hf download {source}` on a machine with internet, or estimate filters with "
                f"`python {SCRIPT} --model MODEL --out DIR` and set method.filters=DIR") from None
        config = path.parent / CONFIG
    else:
        config = path / CONFIG if path.is_dir() else None
        path = path / WEIGHTS if path.is_dir() else path
        if not path.is_file():
            raise KVBenchError(f"Q-Filters file {path} not found: estimate filters with `python {SCRIPT} --model MODEL "
                               f"--out DIR` and set method.filters=DIR, or use a hub id (nthngdy/<model>_qfilt)")
    filters = _read(path)
    if config is not None and config.is_file():
        spec = json.loads(config.read_text())
        declared = tuple(spec.get(k) for k in ("num_layers", "num_kv_heads", "kv_head_dim"))
        if declared != tuple(filters.shape):
            raise KVBenchError(f"Q-Filters {source}: config.json says {declared} but {path.name} holds {tuple(filters.shape)}")
    return filters


def save_filters(folder: str | Path, filters: torch.Tensor) -> Path:
    """Write filters (layers, kv_heads, head_dim) in kvpress's layout: model.safetensors ('q_filters', float32)
    and config.json (num_layers, num_kv_heads, kv_head_dim: QFilters' arguments, nothing else)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({KEY: filters.detach().float().contiguous().cpu()}, str(folder / WEIGHTS), metadata={"format": "pt"})
    layers, heads, dim = filters.shape
    (folder / CONFIG).write_text(json.dumps({"num_layers": layers, "num_kv_heads": heads, "kv_head_dim": dim}) + "\n")
    return folder


@dataclass
class QFilter(Method):
    filters: str = ""  # a folder (model.safetensors + config.json), a .safetensors/.pt file or a hub repo id
    model_path: str | None = None  # the model's hub id (configs: ${model.path}); empty filters: kvpress's repo of it

    name: ClassVar[str] = "qfilter"
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "one dot product per key with a stored filter (no attention)"
    reference: ClassVar[str] = "arXiv:2503.02812; kvpress QFilterPress"
    _filters: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _cast: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (device, dtype) -> filters

    def __post_init__(self):
        super().__post_init__()
        if not self.filters:
            if not self.model_path:
                raise KVBenchError(
                    f"qfilter needs the model's Q-Filters: method.filters=DIR (estimate them with `python {SCRIPT} "
                    "--model MODEL --out DIR`) or a hub id nthngdy/<model>_qfilt (published for a few models)")
            self.filters = kvpress_repo(self.model_path)
        self._filters = load_filters(self.filters)

    def check_model(self, shape: ModelShape, head_dim: int | None = None) -> None:
        """One line when the filters are for another model (layers x KV heads x head_dim)."""
        layers, heads, dim = self._filters.shape
        if (layers, heads) != (shape.num_layers, shape.kv_heads) or head_dim not in (None, dim):
            model = f"{shape.num_layers} x {shape.kv_heads}" + (f" x {head_dim}" if head_dim else "")
            raise KVBenchError(
                f"Q-Filters {self.filters} are {layers} layers x {heads} KV heads x {dim} head_dim but the model has "
                f"{model}: use this model's filters (nthngdy/<model>_qfilt) or estimate them with {SCRIPT}")

    def scores(self, layer) -> torch.Tensor:
        keys = layer.view("keys")  # (batch, kv_heads, n, head_dim)
        layers, heads, dim = self._filters.shape
        if layer.layer_idx >= layers or keys.shape[1] != heads or keys.shape[-1] != dim:
            raise KVBenchError(
                f"Q-Filters {self.filters} are {layers} layers x {heads} KV heads x {dim} head_dim but the model's layer "
                f"{layer.layer_idx} has {keys.shape[1]} KV heads x {keys.shape[-1]} head_dim: use this model's filters "
                f"(nthngdy/<model>_qfilt) or estimate them with {SCRIPT}")
        key = (keys.device, keys.dtype)
        if key not in self._cast:
            self._cast[key] = self._filters.to(device=keys.device, dtype=keys.dtype)
        return -(self._cast[key][layer.layer_idx][None, :, None] * keys).sum(dim=-1)  # kvpress QFilterPress.score

    def prefill_scores(self, layer, stats):
        return self.scores(layer)

    def eviction_scores(self, layer):
        return self.scores(layer)

    def head_budgets(self, layer_idx: int, scores: torch.Tensor, budget: int, shape: ModelShape) -> torch.Tensor:
        self.check_model(shape)
        return super().head_budgets(layer_idx, scores, budget, shape)
