"""The papers' tables as data: how each table of a paper (its CSV in reported/) maps onto kvbench's runs.

`PAPER_TABLES` names one `PaperTable` per experiment; `papers/reproduce.py` runs its sweeps and writes
paper / ours / Δ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

PAPER_DIR = Path(__file__).resolve().parent / "reported"  # the numbers the papers report
AVG = "__avg__"  # a cell that is the mean of a run's sub-task scores


@dataclass(frozen=True)
class PaperTable:
    """How one paper table maps onto our runs."""

    experiment: str  # configs/experiment/<experiment>.yaml (and <experiment>_smoke.yaml)
    csv: str  # papers/reported/<csv>
    index: list[str]  # the CSV's row-key columns
    base: dict  # labels shared by every cell
    rows: dict  # row key (a str, or a tuple for several index columns) -> labels, or None: no run of ours
    columns: dict  # value column -> labels
    smoke: dict | None = None  # label -> {ours at full scale: ours at smoke scale}; None: no smoke scale
    passes: list[list[str]] = field(default_factory=lambda: [[]])  # extra overrides, one sweep each
    analysis: dict | None = None  # value-norm profile to write after the sweep: {"source": ..., "tokens": ...}
    layout: str = ""  # how the runs store the KV cache, for the table's note

    def labels(self, row_key, column: str, scale: str) -> dict | None:
        row = self.rows.get(row_key)
        if row is None or column not in self.columns:
            return None
        labels = {**self.base, **row, **self.columns[column]}
        labels.setdefault("subtask", labels["task"])
        if scale == "smoke":
            labels = {k: self.smoke.get(k, {}).get(v, v) for k, v in labels.items()}
        return labels


WKV_DATASETS = {"PG19": "pg19", "OWT2": "openwebtext2", "ProofPile": "proofpile", "ArXiv": "arxiv"}
WKV_WINDOWS = {"4k": 4096, "8k": 8192, "16k": 16384}
WKV_SMOKE_WINDOWS = {4096: 32, 8192: 64, 16384: 128}
LONGBENCH_TASKS = [
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]
VATP_MODELS = {"LLaMA2-7B-chat": "llama2-7b-chat", "Vicuna-v1.5-7B-16k": "vicuna-v1.5-7b-16k-7500"}
VATP_METHODS = {"Full": "full", "H2O": "h2o", "H2O+VATP": "vatp", "Scissorhands": "scissorhands",
                "Scissorhands+VATP": "vatp-scissorhands"}
# the experiment runs every method per query head (method.gqa=expand), as HeadKV's code: labels end in -expand
HEADKV_METHODS = {"FullKV": "full", "SnapKV": "snapkv-expand", "PyramidKV": "pyramidkv-expand",
                  "Ada-SnapKV": "ada_snapkv-expand", "HeadKV-R": "headkv-r-expand", "HeadKV-R2": "headkv-r2-expand"}
HEADKV_BUDGETS = [64, 96, 128, 256, 512, 1024, 2048]
HEADKV_SMOKE_BUDGETS = [16, 24, 32, 64, 128, 192, 256]  # prompts of at most 512 tokens


def _wkv_task(dataset: str, window: int) -> str:
    return f"ppl_{dataset}_w{window}"


RULER_COMPRESSION = {"0%": None, "25%": 0.75, "50%": 0.5, "80%": 0.2, "90%": 0.1}  # kvpress's ratio -> kvbench's kept share
RULER_METHODS = {"Uncompressed": "full", "KVzip": None, "SnapKV": "snapkv-agnostic",
                 "Ada-SnapKV": "ada_snapkv-agnostic", "ExpectedAttention": None, "Ada-ExpectedAttention": None}

PAPER_TABLES = {
    "weightedkv_ppl": PaperTable(  # arXiv 2503.01330, Table I
        experiment="weightedkv_ppl", csv="weightedkv_table1.csv", index=["cache", "method"],
        base={"model": "llama2-7b"},
        rows={
            ("full", "FullKV"): {"method": "full", "budget": "full"},
            **{(cache, paper): (None if ours is None else {"method": ours, "budget": f"tokens{cache}"})
               for cache in ("1024", "256")
               for paper, ours in {"StreamingLLM": "streamingllm", "TOVA": "tova", "H2O": "h2o-sink4",
                                   "CaM": None, "WeightedKV": "weightedkv"}.items()},
        },
        columns={f"{name} {w}": {"task": _wkv_task(d, size)}
                 for name, d in WKV_DATASETS.items() for w, size in WKV_WINDOWS.items()},
        smoke={"model": {"llama2-7b": "tiny"}, "budget": {"tokens1024": "tokens32", "tokens256": "tokens16"},
               **{k: {_wkv_task(d, w): _wkv_task("synthetic", s) for d in WKV_DATASETS.values()
                      for w, s in WKV_SMOKE_WINDOWS.items()} for k in ("task", "subtask")}},
    ),
    "vatp_longbench": PaperTable(  # arXiv 2406.12335, LongBench at the 50% budget
        experiment="vatp_longbench", csv="vatp_longbench.csv", index=["model", "method"],
        base={"task": "longbench_vatp"},
        rows={(pm, pmeth): {"model": m, "method": meth, "budget": "full" if meth == "full" else "ratio0.5"}
              for pm, m in VATP_MODELS.items() for pmeth, meth in VATP_METHODS.items()},
        columns={**{t: {"subtask": t} for t in LONGBENCH_TASKS}, "Avg": {"subtask": AVG}},
        smoke={"model": {"llama2-7b-chat": "tiny"}, "task": {"longbench_vatp": "longbench"}},
        analysis={"source": "pg19", "tokens": 4096, "smoke_source": "synthetic", "smoke_tokens": 512},
    ),
    "headkv_longbench": PaperTable(  # arXiv 2410.19258, Llama-3-8B-Instruct, mean of the 6 QA tasks
        experiment="headkv_longbench", csv="headkv_llama3.csv", index=["method"],
        base={"model": "llama3-8b-instruct", "task": "longbench", "subtask": AVG},
        rows={paper: {"method": ours, "budget_any": ours == "full"} for paper, ours in HEADKV_METHODS.items()},
        columns={str(b): {"budget": f"tokens{b}"} for b in HEADKV_BUDGETS},
        passes=[[], ["method=snapkv", "method.window=8"], ["method=headkv", "method.variant=r"]],
        layout=("KV layout: per query head (method.gqa=expand), as HeadKV's code: a budget C stores 32 layers x 32 "
                "query heads x C tokens x (K, V) x 128 x 2 bytes (fp16) = C/2 MiB per sequence plus decoded tokens, "
                "4x the per-KV-head layout (C/8 MiB); each run's bytes: meta.json kv.kv_kept_bytes."),
        smoke={"model": {"llama3-8b-instruct": "tiny"},
               "method": {ours: f"{ours}-smoke" for ours in HEADKV_METHODS.values()},  # run.tag of the smoke config
               "budget": {f"tokens{b}": f"tokens{s}" for b, s in zip(HEADKV_BUDGETS, HEADKV_SMOKE_BUDGETS)}},
    ),
    "ruler": PaperTable(  # kvpress's RULER-4k leaderboard numbers (PR #38, #93), Llama-3.1-8B-Instruct, 13-task mean
        experiment="ruler", csv="kvpress_ruler.csv", index=["method"],
        base={"model": "llama3.1-8b-instruct", "task": "ruler_4096", "subtask": AVG},
        rows={paper: None if ours is None else {"method": ours, "budget_any": ours == "full"}
              for paper, ours in RULER_METHODS.items()},
        columns={c: {"budget": "full" if r is None else f"ratio{r:g}"} for c, r in RULER_COMPRESSION.items()},
        layout="kvbench keeps the share 1 - compression of each context (budget.ratio), query-agnostic as kvpress.",
    ),
    "streamingllm_sinks": PaperTable(  # arXiv 2309.17453, attention-sink ablation
        experiment="streamingllm_sinks", csv="streamingllm_sinks.csv", index=["sinks+window"],
        base={"model": "llama2-7b", "task": "ppl_pg19", "budget": "tokens4096"},
        rows={f"{s}+{4096 - s}": {"method": f"streamingllm-sink{s}"} for s in (0, 1, 4)},
        columns={"PPL": {}},
        smoke={"model": {"llama2-7b": "tiny"}, "task": {"ppl_pg19": "ppl_synthetic"},
               "subtask": {"ppl_pg19": "ppl_synthetic"}, "budget": {"tokens4096": "tokens32"}},
    ),
}


def paper_frame(table: PaperTable, paper_dir: Path = PAPER_DIR) -> pd.DataFrame:
    frame = pd.read_csv(paper_dir / table.csv, comment="#", dtype={c: str for c in table.index})
    return frame.set_index(table.index)
