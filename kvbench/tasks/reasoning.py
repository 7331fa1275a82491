"""Long-generation math reasoning: MATH-500 and AIME 2024 / 2025, for decode-stage KV compression.

Reference: NVIDIA/kvpress, `evaluation/evaluate_registry.py` (datasets `aime25`, `math500`, run with
`DecodingPress`), `evaluation/benchmarks/{aime25,math500}/calculate_metrics.py` (scoring),
`kvpress/pipeline.py` (prompt), `notebooks/kvpress_decoding_aime25.ipynb` and `kvzap/evaluate_aime.py`.

Carried over from kvpress:
- the problem is the user message of one chat turn rendered with the model's chat template
  (`add_generation_prompt`), and the whole problem is the question (kvpress's context is " ");
- thinking models think: the decoded text keeps the `<think>` block (kvpress's `predicted_answer`);
- the answer is the content of a `\\boxed{...}`; a prediction without one is wrong; "answered" counts the
  predictions that hold a box (kvpress's `answered`); accuracy = correct / all problems.
Differs on purpose:
- the LAST box with balanced braces (`\\boxed{\\frac{1}{2}}` is `\\frac{1}{2}`; kvpress cuts at the first `}`
  and its math500 scorer takes the first box), and after `</think>` when the thinking closed (the box a
  model writes while thinking is a draft); a last box left open (cut by max_new_tokens) is no answer;
- equivalence by Hugging Face's math-verify (`verify(gold, prediction)`: 0.5 = \\frac{1}{2}, 10^{3} = 1000,
  intervals, unordered sets, `x = 5` = 5, degrees and \\text{} units dropped), or the two strings equal
  without spaces; kvpress compares strings exactly, which marks `\\dfrac{1}{2}` against `\\frac{1}{2}` wrong;
- the default prompt appends "Please reason step by step, and put your final answer within \\boxed{}." (the
  instruction DeepSeek-R1's and Qwen3's model cards give for math): the problem alone (kvpress's notebook,
  `task.template="{problem}"`) leaves non-reasoning models no reason to box their answer;
- decoding is greedy by default (kvpress's pipeline is greedy too; kvzap's AIME script samples at Qwen3's
  temperature 0.6, top-p 0.95, top-k 20: `task.temperature`/`top_p`/`top_k`, one seeded draw per problem):
  pass@1 is the accuracy of that one generation.

Data (one row per problem, hub ids through `datasets`, or `task.data_path`, a .jsonl/.parquet in the same
schema): math500 = HuggingFaceH4/MATH-500 `test` (problem, solution, answer, subject, level, unique_id);
aime24 = HuggingFaceH4/aime_2024 `train` (id, problem, solution, answer, url, year); aime25 = math-ai/aime25
`test` (problem, answer, id; the set kvpress's notebook loads). A `question` column stands in for `problem`.
Offline and not cached, the error names the `datasets` one-liner that fetches it (or writes the jsonl).
"""

from __future__ import annotations

import json
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvbench.engine import Sampling
from kvbench.errors import KVBenchError
from kvbench.models import wrap_chat
from kvbench.tasks.hub_rows import fetch_command, fetch_rows, parquet_rows
from kvbench.tasks.metrics import task_score

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DATASETS = {  # name: (hub id, split)
    "math500": ("HuggingFaceH4/MATH-500", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "train"),
    "aime25": ("math-ai/aime25", "test"),
}
INSTALL = "pip install 'kvbench[math]'"


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced (escaped `\\{`
    `\\}` do not count); `\\boxed 5` takes the word after the space. None: no box, an empty one, or the
    last one never closed (generation cut short)."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at + (6 if text.startswith("\\boxed", at) else 5):]
    if rest.startswith(" "):
        word = rest.strip().split("$")[0].split()
        return word[0] if word else None
    if not rest.startswith("{"):
        return None
    depth, i = 0, 0
    while i < len(rest):
        char = rest[i]
        if char == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes the box
            continue
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            content = rest[1:i].strip()
            return content or None
        i += 1
    return None


def final_text(prediction: str) -> tuple[str, bool | None]:
    """The part of a prediction that holds the answer: after the last `</think>` when the thinking
    closed, else all of it; and whether a thinking block closed (None: the model did not think)."""
    if "</think>" in prediction:
        return prediction.rsplit("</think>", 1)[1], True
    return prediction, (False if "<think>" in prediction else None)


def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise KVBenchError(f"task math checks answers with math-verify, which is not installed: {INSTALL}") from err
    return math_verify


def equivalent(gold: str, answer: str | None) -> bool:
    """Whether a boxed answer equals the reference: equal strings without spaces, else math-verify's
    `verify` on both parsed as `\\boxed{...}` (LaTeX first, then plain expressions)."""
    if answer is None:
        return False
    if "".join(gold.split()) == "".join(answer.split()):
        return True
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    seconds = 5 if threading.current_thread() is threading.main_thread() else None  # its alarm needs the main thread
    parsed_gold = mv.parse(f"\\boxed{{{gold}}}", config, parsing_timeout=seconds)
    parsed = mv.parse(f"\\boxed{{{answer}}}", config, parsing_timeout=seconds)
    return bool(parsed_gold and parsed and mv.verify(parsed_gold, parsed, timeout_seconds=seconds))


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) of a .jsonl or .parquet file."""
    if path.suffix == ".parquet":
        return parquet_rows(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise KVBenchError(f"{path} line {number} is not JSON ({err.msg}); fix or delete that line") from err
        if not isinstance(row, dict):
            raise KVBenchError(f"{path} line {number} is not a JSON object; each line needs problem and answer")
        rows.append((f"{path} line {number}", row))
    return rows


def to_sample(dataset: str, where: str, index: int, row: dict) -> dict:
    """One problem as a sample; a row without a problem or an answer is one error naming the fix."""
    problem = row.get("problem", row.get("question"))
    answer = row.get("answer")
    if not isinstance(problem, str) or not problem.strip():
        raise KVBenchError(f"{where}: no 'problem' text; each row needs problem (or question) and answer")
    if answer is None or not str(answer).strip():
        raise KVBenchError(f"{where}: no 'answer'; each row needs problem (or question) and answer")
    key = row.get("unique_id", row.get("id"))
    return {
        "id": f"{dataset}/{key if key is not None and str(key).strip() else index}",
        "problem": problem,
        "answer": str(answer).strip(),
        "subject": row.get("subject"),
        "level": None if row.get("level") is None else int(row["level"]),
    }


@dataclass
class Reasoning:
    dataset: str = "math500"  # math500 | aime24 | aime25
    data_path: str | None = None  # a local .jsonl/.parquet in the dataset's schema (default: the hub)
    hub_id: str | None = None  # default: DATASETS[dataset]
    split: str | None = None
    template: str = "{problem}\n" + INSTRUCTION  # the user message; "{problem}" is replaced by the problem
    max_new_tokens: int = 8192
    chat: bool = True  # the model's chat format (tokenizer chat templates: model.chat_template_kwargs)
    thinking: bool | None = True  # enable_thinking for the chat template; null: the model config's own
    temperature: float = 0.0  # 0: greedy; > 0: sample (with top_p, top_k), one seeded draw per problem
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    name: ClassVar[str] = "math"

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise KVBenchError(f"task.dataset={self.dataset} is not one of: {', '.join(DATASETS)}")
        if "{problem}" not in self.template:
            raise KVBenchError("task.template must hold {problem}, where the problem goes")
        if self.max_new_tokens <= 0:
            raise KVBenchError(f"task.max_new_tokens={self.max_new_tokens} must be > 0 (reasoning needs thousands)")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise KVBenchError("task.temperature must be >= 0 (0: greedy), task.top_p in (0, 1], task.top_k >= 0")
        _math_verify()  # before hours of generation, not after

    @property
    def label(self) -> str:
        return self.dataset

    def rows(self) -> list[tuple[str, dict]]:
        hub_id, split = self.hub_id or DATASETS[self.dataset][0], self.split or DATASETS[self.dataset][1]
        if self.data_path:
            path = Path(self.data_path).expanduser()
            if path.suffix not in (".jsonl", ".parquet"):
                raise KVBenchError(f"task.data_path={self.data_path}: give a .jsonl or .parquet file")
            if not path.exists():
                raise KVBenchError(f"task.data_path={self.data_path} does not exist; write it online with "
                                   f"`{fetch_command(hub_id, split, self.data_path)}`")
            return read_rows(path)
        return fetch_rows(hub_id, split, "a local .jsonl/.parquet with columns problem and answer")

    def samples(self, tokenizer=None) -> list[dict]:
        samples = [to_sample(self.dataset, where, i, row) for i, (where, row) in enumerate(self.rows())]
        ids = [s["id"] for s in samples]
        if len(set(ids)) != len(ids):
            raise KVBenchError(f"{self.data_path or self.dataset}: ids (unique_id / id) repeat; make them unique")
        if not samples:
            raise KVBenchError(f"{self.data_path or self.dataset} has no problems")
        return samples

    def sampling(self, sample: dict) -> Sampling | None:
        if self.temperature == 0:
            return None
        seed = zlib.crc32(f"{self.seed}/{sample['id']}".encode())
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed)

    def prepare(self, sample: dict, generator):
        """The problem in the template, in the chat format with thinking set; the whole message is the question."""
        text = self.template.replace("{problem}", sample["problem"])  # not str.format: the braces of \boxed{}
        full = text
        if self.chat:
            kwargs = dict(getattr(generator, "chat_template_kwargs", None) or {})
            if self.thinking is not None and generator.chat_format == "tokenizer":
                kwargs["enable_thinking"] = self.thinking
            full = wrap_chat(text, generator.chat_format, generator.tokenizer, kwargs)
        prompt = generator.prompt(full, self.max_new_tokens, chat=False, question=text)
        prompt.sampling = self.sampling(sample)
        return prompt

    def evaluate(self, sample: dict, generator) -> dict:
        prompt = self.prepare(sample, generator)
        return self.record(sample, prompt, generator.run(prompt), generator)

    def record(self, sample: dict, prompt, generation, generator) -> dict:
        prediction = generator.decode(generation.tokens[0])
        text, closed = final_text(prediction)
        answer = last_boxed(text)
        return {
            "id": sample["id"],
            "task": self.label,
            "prediction": prediction,
            "extracted": answer,
            "thinking_closed": closed,
            "hit_max_new_tokens": len(generation.tokens[0]) >= prompt.max_new_tokens,
            "answers": [sample["answer"]],
            "subject": sample["subject"],
            "level": sample["level"],
            "score": float(equivalent(sample["answer"], answer)),
            **generation.record_fields(),
        }

    def score(self, records: list[dict]) -> dict[str, float]:
        return {self.label: task_score([r["score"] for r in records])}

    def score_details(self, records: list[dict]) -> dict:
        """kvpress's `answered` (% with a box), how long the reasoning ran, and MATH-500's accuracy by level and subject."""
        if not records:
            return {}
        details = {
            "answered": task_score([r["extracted"] is not None for r in records]),
            "hit_max_new_tokens": task_score([r["hit_max_new_tokens"] for r in records]),
            "mean_new_tokens": round(sum(r["n_new"] for r in records) / len(records), 1),
        }
        for field in ("level", "subject"):
            groups: dict[str, list[float]] = {}
            for r in records:
                if r.get(field) is not None:
                    groups.setdefault(str(r[field]), []).append(r["score"])
            if groups:
                details[f"by_{field}"] = {k: task_score(v) for k, v in sorted(groups.items())}
        return details
