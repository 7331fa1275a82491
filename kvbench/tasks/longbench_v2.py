"""LongBench v2 (Bai et al., arXiv:2412.15204): 503 long-context multiple-choice questions, run as the official
code runs them.

Reference: THUDM/LongBench at the repository root (commit 2e00731): `pred.py` (prompts, truncation, chat,
answer extraction), `result.py` (scoring), `prompts/0shot.txt`, `0shot_cot.txt`, `0shot_cot_ans.txt`,
`0shot_no_context.txt` (copied byte for byte to `kvbench/tasks/data/longbench_v2/`),
`config/model2maxlen.json` (120000 tokens for the 7-9B models).

Carried over from `pred.py`:
- the template is `0shot.txt`; `0shot_no_context.txt` with `no_context`; `0shot_cot.txt` with `cot`;
  it is filled by `str.replace` in pred.py's order: `$DOC$` (the context, stripped), `$Q$`, `$C_A$`..`$C_D$`
  (each stripped);
- truncation: the filled prompt is tokenized as `tokenizer.encode` does (special tokens added); longer than
  M tokens (`max_prompt_tokens`), the ids become `ids[:M//2] + ids[-M//2:]` (Python's `-M//2` rounds down:
  an odd M keeps one more token at the end) and are decoded together, without special tokens;
- the (truncated) text is the one user message of the model's chat format (`model.chat_format`;
  `tokenizer`: its chat template with the generation prompt, as an OpenAI-compatible server renders it);
- max new tokens 128; with `cot` the first pass (the chain of thought) gets 1024, its output is stripped
  and put for `$COT$` in `0shot_cot_ans.txt` (with the same question and choices; that template has no
  `$DOC$`: the document is not shown again), and the answer pass gets 128;
- `extract_answer`: remove every `*`, then the first `The correct answer is \\(([A-D])\\)`, else the first
  `The correct answer is ([A-D])`, else no answer (wrong); `judge` = the letter equals `answer`.
Carried over from `result.py`: accuracy x100 rounded to 1 decimal (`round(100 * correct / n, 1)`), overall
and by difficulty (`easy`, anything else counts as `hard`) and length (`short`, `medium`, anything else
`long`); `compensated` (off in result.py) scores a response with no answer as 0.25.

Differs, and why:
- decoding is greedy (a KV-compression harness compares methods on the same decoding); pred.py samples at
  temperature 0.1 through the server: `task.temperature=0.1` samples too, one seeded draw per question;
- the default M is the model's `max_prompt_tokens` (what fits the model as kvbench runs it); pred.py's
  model2maxlen is 120000 for the 128k-context 7-9B models: `task.max_prompt_tokens=120000` reproduces it;
- pred.py skips a question whose generation came back empty (its API failed); here an empty generation is
  a response with no answer (wrong), so every question is counted;
- a score column whose group is empty (a `limit` or a filter) is left out (result.py divides by zero);
- `cot` and `no_context` together are refused (pred.py would run the no-context prompt with the CoT
  budget and then a CoT answer pass; its output file names it no_context); RAG (`0shot_rag.txt`) is left
  out: its retrieved chunks are not in the dataset.
Chain of thought in the runner: the first pass is the prompt `prepare` returns (batched with
`run.batch_size`, compressed by the method like any prompt); `record` then runs the short answer pass at
batch 1 through the same generator (method and budget). `question=` marks, in both passes, the text from
"What is the correct answer to this question:" on (the question, the choices, and in the answer pass the
chain of thought), so a query-agnostic method compresses the context alone; with `no_context` the whole
message is the question.

Data: `task.data_path` (a .json list, .jsonl or .parquet in the hub's schema: `_id, domain, sub_domain,
difficulty, length, question, choice_A..choice_D, answer, context`), else the hub dataset
THUDM/LongBench-v2 (split train) through `datasets` (cached); offline and not cached, one line names the
command that fetches it. A malformed row is one line naming the file, the row and the fix.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvbench.engine import Sampling
from kvbench.errors import KVBenchError
from kvbench.tasks import hub_rows
from kvbench.tasks.hub_rows import fetch_rows, parquet_rows
from kvbench.tasks.longbench_rows import _absent, read_jsonl
from kvbench.tasks.stats import Units

TEMPLATES = {name: (Path(__file__).parent / "data" / "longbench_v2" / f"{name}.txt").read_text(encoding="utf-8")
             for name in ("0shot", "0shot_cot", "0shot_cot_ans", "0shot_no_context")}
QUESTION_MARK = "What is the correct answer to this question:"  # where every template's question starts
HUB_ID, SPLIT = "THUDM/LongBench-v2", "train"
FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
          "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
DIFFICULTIES, LENGTHS = ("easy", "hard"), ("short", "medium", "long")
DOMAINS = ("Single-Document QA", "Multi-Document QA", "Long In-context Learning",
           "Long-dialogue History Understanding", "Code Repository Understanding", "Long Structured Data Understanding")
COLUMNS = ("overall", "easy", "hard", "short", "medium", "long")  # result.py's table columns
MAX_NEW, MAX_NEW_COT = 128, 1024  # pred.py's max_new_tokens: answers (and the CoT answer pass), the CoT pass


def fetch_command(hub_id: str = HUB_ID, split: str = SPLIT, out: str | None = None) -> str:
    """The command that puts LongBench v2 in the `datasets` cache (online), or writes it to `out` as jsonl."""
    return hub_rows.fetch_command(hub_id, split, out)


def extract_answer(response: str) -> str | None:
    """pred.py's extract_answer: drop `*`, then `The correct answer is (X)`, else `The correct answer is X`."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match is None:
        match = re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None


def fill(template: str, sample: dict, cot: str | None = None) -> str:
    """The template filled as pred.py fills it: str.replace in its order, every field stripped."""
    text = template.replace("$DOC$", sample["context"].strip()).replace("$Q$", sample["question"].strip())
    for letter in "ABCD":
        text = text.replace(f"$C_{letter}$", sample[f"choice_{letter}"].strip())
    return text if cot is None else text.replace("$COT$", cot)


def truncate_middle(prompt: str, tokenizer, max_tokens: int | None) -> tuple[str, bool]:
    """pred.py's truncation: encode (special tokens added); over M tokens keep ids[:M//2] + ids[-M//2:],
    decoded together without special tokens."""
    ids = tokenizer.encode(prompt)
    if max_tokens is None or len(ids) <= max_tokens:
        return prompt, False
    return tokenizer.decode(ids[: max_tokens // 2] + ids[-max_tokens // 2 :], skip_special_tokens=True), True


def accuracy(scores: list[float]) -> float:
    """result.py's cell: round(100 * sum / n, 1), the sum taken in record order."""
    total = 0
    for score in scores:
        total += score
    return round(100 * total / len(scores), 1)


def column_groups(records: list[dict]) -> dict[str, list[dict]]:
    """The records behind each of result.py's columns (its else branches: not easy is hard, not short or
    medium is long); empty columns left out."""
    groups: dict[str, list[dict]] = {c: [] for c in COLUMNS}
    for r in records:
        groups["overall"].append(r)
        groups["easy" if r["difficulty"] == "easy" else "hard"].append(r)
        groups[r["length"] if r["length"] in ("short", "medium") else "long"].append(r)
    return {c: rows for c, rows in groups.items() if rows}


# ----------------------------------------------------------------------------- data


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for every row of a .json list (the hub's data.json), .jsonl or .parquet file."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", row) for n, row in read_jsonl(path)]
    if path.suffix == ".parquet":
        return parquet_rows(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KVBenchError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); re-download it or fix it") from None
    if not isinstance(rows, list):
        raise KVBenchError(f"{path}: a .json file must hold a list of rows (the hub's data.json); got {type(rows).__name__}")
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]


def check_row(where: str, row) -> dict:
    """One row as a sample; a missing or bad field is one error naming the row and the fix."""
    fix = "re-download the dataset or fix the row"
    if not isinstance(row, dict):
        raise KVBenchError(f"{where}: a row must be an object with {', '.join(FIELDS)}; {fix}")
    missing = [f for f in FIELDS if _absent(row.get(f)) or not isinstance(row.get(f), str)]
    if missing:
        raise KVBenchError(f"{where}: the field(s) {', '.join(missing)} are missing or not text; {fix}")
    for field, allowed in (("difficulty", DIFFICULTIES), ("length", LENGTHS), ("answer", tuple("ABCD"))):
        if row[field] not in allowed:
            raise KVBenchError(f"{where}: {field}={row[field]!r} is not one of {', '.join(allowed)}; {fix}")
    return {"id": row["_id"], **{f: row[f] for f in FIELDS if f != "_id"}}


def _checked_filter(name: str, values, allowed: tuple[str, ...]) -> list[str] | None:
    if values is None:
        return None
    values = [values] if isinstance(values, str) else list(values)
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise KVBenchError(f"task.{name}={values} must list some of: {', '.join(allowed)} (or be null for all)")
    return values


@dataclass
class LongBenchV2:
    cot: bool = False  # pred.py --cot: a chain of thought (0shot_cot.txt), then the answer pass (0shot_cot_ans.txt)
    no_context: bool = False  # pred.py --no_context: the question and choices alone (0shot_no_context.txt)
    data_path: str | None = None  # a local .json/.jsonl/.parquet in the hub's schema; null: the hub dataset
    hub_id: str = HUB_ID
    split: str = SPLIT
    max_prompt_tokens: int | None = None  # M of the middle truncation; null: model.max_prompt_tokens
    chat: bool = True  # the prompt as one user message of the model's chat format
    difficulty: list[str] | None = None  # keep these difficulties (easy, hard); null: all
    length: list[str] | None = None  # keep these lengths (short, medium, long); null: all
    domain: list[str] | None = None  # keep these domains (DOMAINS); null: all
    max_new_tokens: int = MAX_NEW  # pred.py: 128 (the answer, and the answer pass of cot)
    cot_max_new_tokens: int = MAX_NEW_COT  # pred.py: 1024 (the chain of thought)
    compensated: bool = False  # result.py's compensated mode: no answer scores 0.25
    temperature: float = 0.0  # 0: greedy; pred.py samples at 0.1 (one seeded draw per question)
    seed: int = 0

    name: ClassVar[str] = "longbench_v2"
    headline: ClassVar[str] = "overall"  # the run's one number (scores.json average): its columns overlap

    def __post_init__(self):
        if self.cot and self.no_context:
            raise KVBenchError("task.cot and task.no_context cannot both be true (pred.py's output file would be "
                               "the no-context run); choose one")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 2:
            raise KVBenchError(f"task.max_prompt_tokens={self.max_prompt_tokens} must be >= 2 (or null: the model's)")
        if self.max_new_tokens < 1 or self.cot_max_new_tokens < 1:
            raise KVBenchError("task.max_new_tokens and task.cot_max_new_tokens must be >= 1 (pred.py: 128 and 1024)")
        if self.temperature < 0:
            raise KVBenchError(f"task.temperature={self.temperature} must be >= 0 (0: greedy)")
        self.difficulty = _checked_filter("difficulty", self.difficulty, DIFFICULTIES)
        self.length = _checked_filter("length", self.length, LENGTHS)
        self.domain = _checked_filter("domain", self.domain, DOMAINS)

    @property
    def label(self) -> str:
        """The run folder and score column: `longbench_v2`, `_cot` or `_no_context` as pred.py names its files."""
        return self.name + ("_cot" if self.cot else "_no_context" if self.no_context else "")

    # -- data
    def rows(self) -> list[tuple[str, dict]]:
        if self.data_path:
            path = Path(self.data_path).expanduser()
            if path.suffix not in (".json", ".jsonl", ".parquet"):
                raise KVBenchError(f"task.data_path={self.data_path}: give a .json, .jsonl or .parquet file")
            if not path.exists():
                raise KVBenchError(f"task.data_path={self.data_path} does not exist; write it online with "
                                   f"`{fetch_command(self.hub_id, self.split, self.data_path)}`")
            return read_rows(path)
        return fetch_rows(self.hub_id, self.split, "a local .json/.jsonl/.parquet in its schema")

    def samples(self, tokenizer=None) -> list[dict]:
        samples = [check_row(where, row) for where, row in self.rows()]
        source = self.data_path or f"{self.hub_id} ({self.split})"
        if not samples:
            raise KVBenchError(f"{source} has no rows; re-download it or point task.data_path at the data")
        ids = [s["id"] for s in samples]
        if len(set(ids)) != len(ids):
            raise KVBenchError(f"{source}: _id repeats ({sorted({i for i in ids if ids.count(i) > 1})[0]}); make ids unique")
        for field in ("difficulty", "length", "domain"):
            keep = getattr(self, field)
            if keep is not None:
                samples = [s for s in samples if s[field] in keep]
        if not samples:
            raise KVBenchError(f"{source}: no row matches task.difficulty/length/domain; widen the filter")
        return samples

    # -- evaluation
    def _prompt(self, template: str, max_new_tokens: int, sample: dict, generator, cot: str | None = None):
        """The filled template truncated as pred.py does, its question marked, in the chat format, sampled
        when asked. The question: the filled template from QUESTION_MARK on (the last QUESTION_MARK if
        truncation changed that text; none if it cut it out); with `no_context`, the whole message."""
        limit = self.max_prompt_tokens if self.max_prompt_tokens is not None else generator.max_prompt_tokens
        text, truncated = truncate_middle(fill(template, sample, cot), generator.tokenizer, limit)
        question = fill(template[template.index(QUESTION_MARK):], sample, cot)
        if self.no_context:
            question = text
        elif not text.endswith(question):
            at = text.rfind(QUESTION_MARK)
            question = text[at:] if at >= 0 else None
        prompt = generator.prompt(text, max_new_tokens, chat=self.chat, question=question, truncated=truncated)
        if self.temperature > 0:
            seed = zlib.crc32(f"{self.seed}/{sample['id']}/{max_new_tokens}".encode())
            prompt.sampling = Sampling(temperature=self.temperature, seed=seed)
        return prompt

    def prepare(self, sample: dict, generator):
        """The first (with `cot`, the chain-of-thought) pass's prompt."""
        template = TEMPLATES["0shot_no_context" if self.no_context else "0shot_cot" if self.cot else "0shot"]
        return self._prompt(template, self.cot_max_new_tokens if self.cot else self.max_new_tokens, sample, generator)

    def record(self, sample: dict, prompt, generation, generator) -> dict:
        """The record; with `cot`, runs the answer pass first (batch 1, same method and budget)."""
        response = generator.decode(generation.tokens[0])
        extra = {}
        if self.cot:
            thought = response.strip()
            answer_prompt = self._prompt(TEMPLATES["0shot_cot_ans"], self.max_new_tokens, sample, generator, cot=thought)
            answer = generator.run(answer_prompt)
            response = generator.decode(answer.tokens[0])
            extra = {"response_cot": thought, "answer_pass": {"truncated": answer_prompt.info["truncated"],
                                                              **answer.record_fields()}}
        pred = extract_answer(response.strip())
        judge = pred == sample["answer"]
        return {
            "id": sample["id"],
            "task": self.label,
            "prediction": response.strip(),
            "answers": [sample["answer"]],
            "pred": pred,
            "judge": judge,
            "difficulty": sample["difficulty"],
            "length": sample["length"],
            "domain": sample["domain"],
            "sub_domain": sample["sub_domain"],
            "truncated": prompt.info["truncated"],
            "score": 0.25 if self.compensated and pred is None else float(judge),
            **extra,
            **generation.record_fields(),
        }

    def evaluate(self, sample: dict, generator) -> dict:
        prompt = self.prepare(sample, generator)
        return self.record(sample, prompt, generator.run(prompt), generator)

    def score(self, records: list[dict]) -> dict[str, float]:
        """result.py's row: overall, easy, hard, short, medium, long (a column with no records is left out)."""
        return {column: accuracy([r["score"] for r in rows]) for column, rows in column_groups(records).items()}

    def units(self, records: list[dict]) -> dict[str, Units]:
        """One resampling unit per question in each column (kvbench.tasks.stats), for the 95% intervals."""
        import numpy as np

        return {column: Units([r["id"] for r in rows], np.array([float(r["score"]) for r in rows]), np.ones(len(rows)))
                for column, rows in column_groups(records).items()}

    def score_details(self, records: list[dict]) -> dict:
        """How many responses held no answer, and accuracy by domain (LongBench v2's paper breaks it down so)."""
        if not records:
            return {}
        domains: dict[str, list[float]] = {}
        for r in records:
            domains.setdefault(r["domain"], []).append(r["score"])
        return {"no_answer": accuracy([float(r["pred"] is None) for r in records]),
                "by_domain": {d: accuracy(v) for d, v in sorted(domains.items())}}
