"""RULER's qa_1 (SQuAD v2 dev) and qa_2 (HotpotQA dev, distractor) data, and kvpress's pre-built RULER set.

`load_qa(dataset, source)` reads the data as NVIDIA/RULER's `scripts/data/synthetic/qa.py` (commit c3f5e3b)
does (`read_squad`, `read_hotpotqa`): the documents are every distinct SQuAD paragraph, or every distinct
HotpotQA "{title}\\n{sentences joined with ''}", sorted; a SQuAD question counts unless `is_impossible`, with
its answers' texts, its paragraph and (`more_context`) the other paragraphs of its article; a HotpotQA question
has its answer and its 10 context documents. `generate_qa(...)` is qa.py's generation on it
(kvbench.tasks.ruler_data.make_qa: tests/unit/test_ruler_qa.py holds records RULER's own script wrote).

Data: `source` = RULER's file (`scripts/data/synthetic/json/download_qa_dataset.sh` saves SQuAD's
`dev-v2.0.json` as squad.json, HotpotQA's `hotpot_dev_distractor_v1.json` as hotpotqa.json) or a folder holding
it; else the same data through `datasets` from the hub cache (`rajpurkar/squad_v2` validation,
`hotpotqa/hotpot_qa` distractor validation: rows in the files' order, regrouped into articles of paragraphs of
questions, and HotpotQA's context columns back into [title, sentences] pairs). Offline and not cached: one
error naming `scripts/prepare_ruler_qa.py`.

`load_kvpress(path_or_hub, context_tokens)`: kvpress's RULER set (NVIDIA/kvpress
`evaluation/benchmarks/ruler/`: `simonjegou/ruler`, one config / data_dir per length 4096, 8192, 16384, split
test), made by its `generate.sh` (RULER's prepare.py, base template, Llama-3.1-8B's tokenizer, 500 samples per
task) and `create_huggingface_dataset.py`: RULER's input (then still ending with the answer prefix) cut at the
last match of the task's question pattern (qa: "Answer the question based on the given documents.") into
`context` and the rest, the rest cut at the first answer pattern (qa: "Answer:") into `question` and
`answer_prefix`; `answer` = RULER's outputs. kvpress prompts it (`kvpress/pipeline.py` preprocess, default
`query_aware: false`): with a chat template, apply_chat_template([user: context + question],
add_generation_prompt=True) + answer_prefix, the context part (everything before the question) encoded alone
and compressed, the question part (question + the template's end + answer_prefix) encoded alone and appended;
without one, BOS + context, then question + "\\n" + answer_prefix. kvbench's Ruler task gives the same text
(chat: input = context + question, question = the question, answer prefix after the chat wrapping) but encodes
it whole (a token spanning the boundary goes to the question), and without a chat template has no "\\n".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvbench.errors import KVBenchError

HUB = {"squad": ("rajpurkar/squad_v2", None, "validation"), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation")}
FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
FETCH = "python scripts/prepare_ruler_qa.py --out data/ruler   (once, where the hub is reachable)"


def _malformed(where: str, dataset: str, row: str, problem: str) -> KVBenchError:
    original = "dev-v2.0.json" if dataset == "squad" else "hotpot_dev_distractor_v1.json"
    name = "SQuAD v2's JSON format" if dataset == "squad" else "HotpotQA's distractor JSON format"
    return KVBenchError(f"{where}: {row} {problem}: not {name}; use the file RULER downloads ({original}) or: {FETCH}")


def read_squad(data: dict, where: str) -> tuple[list[dict], list[str]]:
    """RULER's read_squad on SQuAD v2's JSON: answerable questions only."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise _malformed(where, "squad", "the top level", "has no 'data' list")
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise _malformed(where, "squad", f"data[{a}]", "has no 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            row = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise _malformed(where, "squad", row, "has no 'context' text")
            for q, qa in enumerate(paragraph.get("qas") if isinstance(paragraph.get("qas"), list) else [None]):
                fields = isinstance(qa, dict) and isinstance(qa.get("question"), str) and "is_impossible" in qa \
                    and isinstance(qa.get("answers"), list) and all(isinstance(x, dict) and isinstance(x.get("text"), str)
                                                                    for x in qa["answers"])
                if not fields:
                    raise _malformed(where, "squad", f"{row}.qas[{q}]",
                                     "lacks 'question', 'is_impossible' or 'answers' [{'text': ...}]")
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
    return questions, docs


def read_hotpotqa(data: list, where: str) -> tuple[list[dict], list[str]]:
    """RULER's read_hotpotqa on HotpotQA's distractor JSON: a document is its title, a newline, its sentences joined."""
    if not isinstance(data, list):
        raise _malformed(where, "hotpotqa", "the top level", "is not a list of questions")
    for r, row in enumerate(data):
        ok = isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str) \
            and isinstance(row.get("context"), list) and all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list)
                and all(isinstance(s, str) for s in c[1]) for c in row["context"])
        if not ok:
            raise _malformed(where, "hotpotqa", f"row {r}",
                             "lacks 'question', 'answer' or 'context' [[title, [sentences]], ...]")
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    questions = [{"query": d["question"], "outputs": [d["answer"]],
                  "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return questions, docs


def hub_rows_as_json(dataset: str, rows) -> dict | list:
    """The hub's rows regrouped as the JSON files hold them (articles of paragraphs of questions; HotpotQA's
    context as [title, sentences] pairs)."""
    if dataset == "hotpotqa":
        return [{"question": r["question"], "answer": r["answer"],
                 "context": [[t, list(s)] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]}
                for r in rows]
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


def generate_qa(dataset: str, tokenizer, max_seq_length: int, num_samples: int, seed: int = 42,
                source: str | None = None, pre_samples: int = 0) -> list[dict]:
    """RULER's qa.py records for `dataset` (squad: qa_1, hotpotqa: qa_2) with the base template: `source` is
    RULER's file or a folder holding it (None: the hub cache); `pre_samples`: prepare.py's chunking offset
    (sample i asks question i + pre_samples)."""
    from kvbench.tasks.ruler_data import make_qa

    return make_qa(f"qa ({dataset})", tokenizer, max_seq_length, num_samples, seed, dataset=dataset,
                   qa_data=load_qa(dataset, source), pre_samples=pre_samples)


KVPRESS_COLUMNS = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")


def _kvpress_rows(source: str, context_tokens: int) -> tuple[list[dict], str]:
    local = Path(source).expanduser()
    if local.is_dir():
        local = next((local / f"{context_tokens}{ext}" for ext in (".parquet", ".jsonl")
                      if (local / f"{context_tokens}{ext}").exists()), local / f"{context_tokens}.parquet")
    if local.suffix in (".parquet", ".jsonl"):
        if not local.exists():
            raise KVBenchError(f"{local} not found: kvpress's RULER set; save it with datasets where the hub is "
                               f"reachable: python -c \"import datasets; datasets.load_dataset('simonjegou/ruler', "
                               f"data_dir='{context_tokens}', split='test').to_parquet('{local}')\"")
        import pandas as pd

        try:
            frame = pd.read_parquet(local) if local.suffix == ".parquet" else pd.read_json(local, lines=True)
        except (ValueError, OSError) as err:
            raise KVBenchError(f"{local}: not a readable {local.suffix[1:]} file ({err}); save it again") from err
        return frame.to_dict("records"), str(local)
    import datasets

    errors = []
    for kwargs in ({"name": str(context_tokens)}, {"data_dir": str(context_tokens)}):  # kvpress: data_dir
        try:
            return list(datasets.load_dataset(source, split="test", **kwargs)), source
        except Exception as err:  # offline and not cached, or no such length
            errors.append(type(err).__name__)
    raise KVBenchError(f"kvpress's RULER set {source} ({context_tokens}) is not in the hub cache "
                       f"({', '.join(errors)}); fetch it where the hub is reachable: python -c \"import datasets; "
                       f"datasets.load_dataset('{source}', data_dir='{context_tokens}', split='test')\" (kvpress's "
                       f"lengths: 4096, 8192, 16384)")


def load_kvpress(path_or_hub: str, context_tokens: int) -> list[dict]:
    """kvpress's RULER rows at `context_tokens`, in the set's order: from a local .parquet / .jsonl (or a folder
    holding <context_tokens>.parquet / .jsonl), else the hub id through `datasets`. Each: id (<task>-<k>, k
    counting that task's rows), task, context, question, answer_prefix, outputs (the references), max_new_tokens."""
    rows, where = _kvpress_rows(path_or_hub, context_tokens)
    out, seen = [], {}
    for i, row in enumerate(rows):
        missing = [c for c in KVPRESS_COLUMNS if c not in row]
        if missing:
            raise KVBenchError(f"{where}: row {i} has no {', '.join(missing)}; kvpress's RULER set has the columns "
                               f"{', '.join(KVPRESS_COLUMNS)} (fetch it again)")
        answer = row["answer"]
        answer = [answer] if isinstance(answer, str) else answer
        texts = [row["context"], row["question"], row["answer_prefix"], row["task"]]
        try:
            outputs = [a for a in list(answer) if isinstance(a, str)]
            max_new_tokens = int(row["max_new_tokens"])
        except (TypeError, ValueError):
            outputs, max_new_tokens = [], 0
        if not all(isinstance(t, str) for t in texts) or not outputs or len(outputs) != len(answer) \
                or max_new_tokens <= 0:
            raise KVBenchError(f"{where}: row {i} is malformed (context, question, answer_prefix and task are texts, "
                               f"answer a list of texts, max_new_tokens a positive integer): fetch the set again")
        k = seen[row["task"]] = seen.get(row["task"], -1) + 1
        out.append({"id": f"{row['task']}-{k}", "task": row["task"], "context": row["context"],
                    "question": row["question"], "answer_prefix": row["answer_prefix"], "outputs": outputs,
                    "max_new_tokens": max_new_tokens})
    return out
