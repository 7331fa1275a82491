"""RULER's QA data (qa_1: SQuAD v2 dev, qa_2: HotpotQA dev distractor) and kvpress's pre-built RULER set.

`load_qa(dataset, path)` returns (questions, documents) as NVIDIA/RULER's `scripts/data/synthetic/qa.py`
reads them (`read_squad`, `read_hotpotqa`): every distinct document, sorted; each answerable question with
its answers, its documents' indices and (SQuAD) the other paragraphs of its article. From
- a local file in the format RULER downloads (`scripts/data/synthetic/json/download_qa_dataset.sh`:
  SQuAD's `dev-v2.0.json`, HotpotQA's `hotpot_dev_distractor_v1.json`), or
- the same data through `datasets` from the hub cache (`rajpurkar/squad_v2` validation,
  `hotpotqa/hotpot_qa` distractor validation), rows regrouped as the JSON files hold them.
Offline and not cached: one error naming the command that fetches it (`scripts/prepare_ruler_qa.py`).

`load_kvpress(source, context_tokens)`: kvpress's RULER set (`simonjegou/ruler`, one config per length; or a
local parquet/jsonl with its columns context, question, answer_prefix, answer, task, max_new_tokens), made by
kvpress's `evaluation/benchmarks/ruler/create_huggingface_dataset.py` from RULER's files with Llama-3.1-8B's
tokenizer. kvpress prompts it as the chat template of (context + question), then the answer prefix; the
context is compressed before the question (query-agnostic), and predictions are stripped of control
characters before scoring (RULER turns them into newlines).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvbench.errors import KVBenchError

HUB = {"squad": ("rajpurkar/squad_v2", None, "validation"), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation")}
FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
FETCH = "python scripts/prepare_ruler_qa.py --out data/ruler   (once, where the hub is reachable)"


def read_squad(data: dict, where: str) -> tuple[list[dict], list[str]]:
    """RULER's read_squad on SQuAD v2's JSON: answerable questions only."""
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        questions = []
        for d in data["data"]:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                          "context": [index[p["context"]]],
                                          "more_context": [i for i in article if i != index[p["context"]]]})
    except (KeyError, TypeError) as err:
        raise KVBenchError(f"{where}: not SQuAD v2's JSON format (missing {err}); use the file RULER downloads "
                           f"(dev-v2.0.json) or: {FETCH}") from err
    return questions, docs


def read_hotpotqa(data: list, where: str) -> tuple[list[dict], list[str]]:
    """RULER's read_hotpotqa on HotpotQA's distractor JSON: a document is its title, a newline, its sentences joined."""
    try:
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        questions = [{"query": d["question"], "outputs": [d["answer"]],
                      "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    except (KeyError, TypeError, ValueError) as err:
        raise KVBenchError(f"{where}: not HotpotQA's distractor JSON format ({err}); use the file RULER downloads "
                           f"(hotpot_dev_distractor_v1.json) or: {FETCH}") from err
    return questions, docs


def hub_rows_as_json(dataset: str, rows) -> dict | list:
    """The hub's rows regrouped as the JSON files hold them (articles of paragraphs of questions; HotpotQA's
    context as [title, sentences] pairs)."""
    if dataset == "hotpotqa":
        return [{"question": r["question"], "answer": r["answer"],
                 "context": [[t, s] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]} for r in rows]
    articles: dict[str, dict[str, list]] = {}
    for r in rows:
        paragraphs = articles.setdefault(r["title"], {})
        paragraphs.setdefault(r["context"], []).append(
            {"question": r["question"], "is_impossible": not r["answers"]["text"],
             "answers": [{"text": t} for t in r["answers"]["text"]]})
    return {"data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in ps.items()]}
                     for t, ps in articles.items()]}


def load_qa(dataset: str, path: str | None = None) -> tuple[list[dict], list[str]]:
    """(questions, documents) of `dataset` (squad | hotpotqa): from `path` (a file, or a folder holding RULER's
    squad.json / hotpotqa.json), else from the hub cache through `datasets`."""
    if dataset not in FILES:
        raise KVBenchError(f"RULER qa dataset {dataset} is not one of: {', '.join(FILES)}")
    reader = read_squad if dataset == "squad" else read_hotpotqa
    if path:
        file = Path(path).expanduser()
        file = file / FILES[dataset] if file.is_dir() else file
        if not file.exists():
            raise KVBenchError(f"{file} not found: RULER's {dataset} file; fetch it with: {FETCH}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise KVBenchError(f"{file}: not JSON ({err.msg} at line {err.lineno}); fetch it again: {FETCH}") from err
        return reader(data, str(file))
    repo, config, split = HUB[dataset]
    try:
        import datasets

        rows = datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # offline and not cached: datasets raises ConnectionError, or its own errors
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        raise KVBenchError(f"RULER {dataset}: {repo} is not in the hub cache{' (HF_HUB_OFFLINE is set)' if offline else ''}"
                           f" ({type(err).__name__}); fetch it with: {FETCH}, then set task.qa_dir=data/ruler") from err
    return reader(hub_rows_as_json(dataset, rows), f"{repo} ({split})")


KVPRESS_COLUMNS = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")


def load_kvpress(source: str, context_tokens: int) -> list[dict]:
    """kvpress's RULER rows at `context_tokens` (its hub configs are the lengths: 4096, 8192, 16384): a local
    .parquet / .jsonl file (or a folder holding <context_tokens>.parquet), else the hub id through `datasets`."""
    local = Path(source).expanduser()
    if local.is_dir():
        local = next((local / f"{context_tokens}{ext}" for ext in (".parquet", ".jsonl")
                      if (local / f"{context_tokens}{ext}").exists()), local / f"{context_tokens}.parquet")
    if local.suffix in (".parquet", ".jsonl"):
        if not local.exists():
            raise KVBenchError(f"{local} not found: kvpress's RULER set; save it with datasets where the hub is "
                               f"reachable: load_dataset('simonjegou/ruler', '{context_tokens}', split='test')"
                               f".to_parquet('{local}')")
        import pandas as pd

        frame = pd.read_parquet(local) if local.suffix == ".parquet" else pd.read_json(local, lines=True)
        rows, where = frame.to_dict("records"), str(local)
    else:
        try:
            import datasets

            rows, where = list(datasets.load_dataset(source, str(context_tokens), split="test")), source
        except Exception as err:
            raise KVBenchError(f"kvpress's RULER set {source} ({context_tokens}) is not in the hub cache "
                               f"({type(err).__name__}); fetch it where the hub is reachable: python -c \"import "
                               f"datasets; datasets.load_dataset('{source}', '{context_tokens}', split='test')\"") from err
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in KVPRESS_COLUMNS if c not in row]
        if missing:
            raise KVBenchError(f"{where}: row {i} has no {', '.join(missing)}; kvpress's RULER set has the columns "
                               f"{', '.join(KVPRESS_COLUMNS)} (fetch it again)")
        out.append({"task": str(row["task"]), "context": row["context"], "question": row["question"],
                    "answer_prefix": row["answer_prefix"], "outputs": [str(a) for a in list(row["answer"])],
                    "max_new_tokens": int(row["max_new_tokens"])})
    return out
