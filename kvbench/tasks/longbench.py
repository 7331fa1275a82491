"""LongBench v1 (Bai et al., arXiv:2308.14508): the 16 English tasks, run as the official code runs them.

Per sample, in the order of THUDM/LongBench `LongBench/pred.py`:
1. fill the task's official prompt template (`data/longbench.json`, verbatim);
2. tokenize (BOS included); longer than the model's max prompt length M
   (`model.max_prompt_tokens`, LongBench's model2maxlen): keep the first and
   last ⌊M/2⌋ tokens, decode each half without special tokens, join the strings;
3. wrap in the model's chat format, except for trec, triviaqa, samsum, lcc,
   repobench-p; tokenize again;
4. greedy decoding up to the task's max new tokens; samsum also stops at a
   newline token and generates at least one token;
5. decode the new tokens without special tokens.
Scoring as `eval.py`: the first-line rule for trec, triviaqa, samsum; per
sample the max over the reference answers; per task round(100·mean, 2); the
average is the mean of the task scores; LongBench-E files are also scored by
length bucket (0-4k, 4-8k, 8k+).

Variants: `standard` (`{task}.jsonl`), `e` (LongBench-E, `{task}_e.jsonl`, 13
tasks) and `vatp` (what VATP's code ran: the 13 LongBench-E files plus
narrativeqa, musique and qmsum from the standard files).

Data: a folder of `{file}.jsonl` or `{file}.parquet` (`task.data_dir`), else
a parquet mirror on the hub (`task.parquet_repo`), else the official
`data.zip` from the hub (`THUDM/LongBench`, cached by huggingface_hub) when
downloads are allowed and the hub is reachable. Offline with no file, the
error names the command that downloads it.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvbench.errors import KVBenchError
from kvbench.models import wrap_chat
from kvbench.tasks.longbench_rows import check_rows, read_jsonl
from kvbench.tasks.metrics import best_over_answers, first_line, length_bucket, task_score

SPEC = json.loads((Path(__file__).parent / "data" / "longbench.json").read_text())
TASKS = list(SPEC["tasks"])  # the papers' order
METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "musique": "qa_f1", "gov_report": "rouge_l", "qmsum": "rouge_l",
    "multi_news": "rouge_l", "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l",
    "passage_count": "count", "passage_retrieval_en": "retrieval", "lcc": "code_sim", "repobench-p": "code_sim",
}
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
E_TASKS = [
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]
VARIANTS = ("standard", "e", "vatp")


def data_files(variant: str, subsets=None) -> list[tuple[str, str]]:
    """(task, file stem) pairs of a variant, in the papers' task order."""
    if variant not in VARIANTS:
        raise KVBenchError(f"task.variant={variant} is not one of: {', '.join(VARIANTS)}")
    if variant == "standard":
        pairs = [(t, t) for t in TASKS]
    elif variant == "e":
        pairs = [(t, f"{t}_e") for t in TASKS if t in E_TASKS]
    else:
        pairs = [(t, f"{t}_e" if t in E_TASKS else t) for t in TASKS]
    if subsets:
        unknown = sorted(set(subsets) - {t for t, _ in pairs})
        if unknown:
            raise KVBenchError(
                f"task.subsets has {', '.join(unknown)}, not a task of LongBench variant '{variant}'; "
                f"choose from: {', '.join(t for t, _ in pairs)}"
            )
        pairs = [(t, f) for t, f in pairs if t in set(subsets)]
    return pairs


def truncate_middle(prompt: str, tokenizer, max_tokens: int | None) -> tuple[str, bool]:
    """LongBench's middle truncation: first and last ⌊M/2⌋ tokens, each half decoded, strings joined."""
    ids = tokenizer(prompt, truncation=False).input_ids
    if max_tokens is None or len(ids) <= max_tokens:
        return prompt, False
    half = int(max_tokens / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def build_prompt(sample: dict, task: str, tokenizer, max_tokens: int | None, chat_format: str,
                 template_kwargs: dict | None = None) -> tuple[str, bool]:
    """The text that is tokenized for generation, and whether it was truncated."""
    prompt = SPEC["tasks"][task]["prompt"].format(**sample)
    prompt, truncated = truncate_middle(prompt, tokenizer, max_tokens)
    if task not in NO_CHAT:
        prompt = wrap_chat(prompt, chat_format, tokenizer, template_kwargs)
    return prompt, truncated


def _strings(values) -> list[str]:
    """A list of str from a jsonl list, a parquet array, or None."""
    return [] if values is None else [str(v) for v in values]


def newline_token_id(tokenizer) -> int:
    """samsum's extra stop token, as pred.py finds it."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


@dataclass
class LongBench:
    variant: str = "standard"  # standard | e | vatp
    subsets: list[str] | None = None  # default: every task of the variant
    data_dir: str = "data/longbench"  # a folder of {task}.jsonl / {task}_e.jsonl (or .parquet)
    download: bool = True  # fetch the official data.zip from the hub when a file is missing (needs the hub)
    hub_repo: str = "THUDM/LongBench"
    parquet_repo: str | None = None  # a parquet mirror on the hub: load_dataset(repo, file_stem, split="test")

    name: ClassVar[str] = "longbench"

    @property
    def label(self) -> str:
        return self.name if self.variant == "standard" else f"{self.name}_{self.variant}"

    def __post_init__(self):
        self.files = data_files(self.variant, self.subsets)

    # -- data
    def _missing(self, stem: str) -> KVBenchError:
        return KVBenchError(
            f"LongBench file {stem}.jsonl is not in {self.data_dir}: run "
            f"`python scripts/prepare_longbench.py --out {self.data_dir}` on a machine with internet "
            f"(it fetches {self.hub_repo}'s data.zip), or set task.data_dir to a folder of LongBench jsonl files"
        )

    def _download(self) -> bool:
        if not self.download or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            return False
        try:
            extract_data_zip(self.hub_repo, self.data_dir)
        except Exception:  # noqa: BLE001 - no network or no such file: fall back to the clear error
            return False
        return True

    def _load_local(self, stem: str) -> list[dict] | None:
        folder = Path(self.data_dir)
        path = folder / f"{stem}.jsonl"
        if path.exists():
            return self._checked(stem, str(path), read_jsonl(path))
        path = folder / f"{stem}.parquet"
        if path.exists():
            import pandas as pd

            rows = pd.read_parquet(path).to_dict("records")
            return self._checked(stem, f"{path} row", list(enumerate(rows, start=1)))
        return None

    def _checked(self, stem: str, source: str, rows: list[tuple[int, dict]]) -> list[dict]:
        task = next(t for t, s in self.files if s == stem)
        return check_rows(rows, source, e_file=stem.endswith("_e"), classification=METRIC[task] == "classification")

    def load(self, stem: str) -> list[dict]:
        """A local file, else the parquet mirror, else the official data.zip (then the local file again)."""
        rows = self._load_local(stem)
        if rows is None and self.parquet_repo:
            from datasets import load_dataset

            try:
                rows = list(load_dataset(self.parquet_repo, stem, split="test"))
            except Exception as err:  # noqa: BLE001
                raise KVBenchError(f"could not load {stem} from task.parquet_repo={self.parquet_repo}: {err}") from err
            return self._checked(stem, f"{self.parquet_repo}/{stem} row", list(enumerate(rows, start=1)))
        if rows is None and self._download():
            rows = self._load_local(stem)
        if rows is None:
            raise self._missing(stem)
        return rows

    def samples(self, tokenizer=None) -> list[dict]:
        out = []
        for task, stem in self.files:
            rows = self.load(stem)
            if not rows:
                raise KVBenchError(f"LongBench subset {task} has no samples ({stem} is empty); "
                                   f"drop it from task.subsets or fix the file in {self.data_dir}")
            for row in rows:
                out.append({
                    "id": f"{stem}/{row['_id']}",
                    "task": task,
                    "file": stem,
                    "context": row["context"],
                    "input": row["input"],
                    "answers": _strings(row["answers"]),
                    "all_classes": _strings(row.get("all_classes")),
                    "length": int(row.get("length") or 0),
                })
        return out

    def limit_samples(self, samples: list[dict], limit: int) -> list[dict]:
        """`task.limit` per sub-task (as lm-evaluation-harness's --limit): the first `limit` of each file."""
        taken: dict[str, int] = {}
        out = []
        for sample in samples:
            if taken.get(sample["file"], 0) < limit:
                taken[sample["file"]] = taken.get(sample["file"], 0) + 1
                out.append(sample)
        return out

    # -- evaluation
    def prepare(self, sample: dict, generator):
        """The sample's prompt (the template, truncated in the middle to the model's maximum, in its chat format)."""
        task = sample["task"]
        tokenizer = generator.tokenizer
        prompt, truncated = build_prompt(
            sample, task, tokenizer, generator.max_prompt_tokens, generator.chat_format,
            getattr(generator, "chat_template_kwargs", None),
        )
        stops, min_new = ([newline_token_id(tokenizer)], 1) if task == "samsum" else ([], 0)
        template = SPEC["tasks"][task]["prompt"]
        question = template.split("{context}", 1)[1].format(**sample)  # what follows the context: the question
        return generator.prompt(prompt, SPEC["tasks"][task]["max_new_tokens"], chat=False, stop_token_ids=stops,
                                min_new_tokens=min_new, question=question, truncated=truncated)

    def record(self, sample: dict, prompt, generation, generator) -> dict:
        task = sample["task"]
        prediction = generator.decode(generation.tokens[0])
        scored = first_line(prediction) if task in FIRST_LINE else prediction
        return {
            "id": sample["id"],
            "task": task,
            "prediction": prediction,
            "answers": sample["answers"],
            "all_classes": sample["all_classes"],
            "length": sample["length"],
            "truncated": prompt.info["truncated"],
            "score": best_over_answers(METRIC[task], scored, sample["answers"], sample["all_classes"]),
            **generation.record_fields(),
        }

    def evaluate(self, sample: dict, generator) -> dict:
        prompt = self.prepare(sample, generator)
        return self.record(sample, prompt, generator.run(prompt), generator)

    def score(self, records: list[dict]) -> dict[str, float]:
        by_task: dict[str, list[float]] = {}
        for record in records:
            by_task.setdefault(record["task"], []).append(record["score"])
        return {task: task_score(by_task[task]) for task, _ in self.files if task in by_task}

    def score_details(self, records: list[dict]) -> dict:
        """LongBench-E: scores per task and length bucket (None where a bucket is empty)."""
        buckets: dict[str, dict[str, list[float]]] = {}
        for record in records:
            if record["id"].split("/")[0].endswith("_e"):
                per_task = buckets.setdefault(record["task"], {"0-4k": [], "4-8k": [], "8k+": []})
                per_task[length_bucket(record["length"])].append(record["score"])
        return {
            "length_buckets": {
                task: {b: (task_score(v) if v else None) for b, v in per_task.items()} for task, per_task in buckets.items()
            }
        } if buckets else {}


def extract_data_zip(repo: str, out_dir: str | Path) -> Path:
    """Download the official data.zip (cached by huggingface_hub) and unzip its jsonl files into out_dir."""
    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(repo_id=repo, filename="data.zip", repo_type="dataset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            if member.endswith(".jsonl"):
                target = out / Path(member).name
                tmp = target.with_suffix(".jsonl.tmp")
                tmp.write_bytes(zf.read(member))
                tmp.replace(target)
    return out
