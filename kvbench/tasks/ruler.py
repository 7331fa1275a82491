"""RULER (Hsieh et al., arXiv:2404.06654): 13 synthetic tasks at a target length, scored as NVIDIA/RULER scores them.

Samples are generated locally, seeded, with the evaluated model's own tokenizer (kvbench.tasks.ruler_data: the
same records as RULER's `scripts/data/prepare.py --model_template_type base`), or read from kvpress's pre-built
set (`source: kvpress`, made with Llama-3.1-8B's tokenizer: what kvpress's leaderboard runs). The prompt is
RULER's input in the model's chat format (`chat`), then the answer prefix, as kvpress prompts it (RULER's own
runs use per-model templates; `chat: false` is its `base` template). Greedy decoding of the task's
tokens_to_generate (niah 128, vt 30, cwe 120, fwe 50, qa 32).

Scoring, as `scripts/eval/evaluate.py` with `scripts/eval/synthetic/constants.py`: the prediction stripped and
its control characters made newlines (kvpress's set: removed, as kvpress's calculate_metrics does);
`string_match_all` (the share of the references found in the prediction, case-insensitive) for niah, vt, cwe,
fwe, `string_match_part` (1 if any reference is found) for qa; a task's score round(sum / n * 100, 2); the
table's Avg is the mean over the 13 tasks, as RULER reports. The question of each prompt starts where kvpress
splits it (its QUESTION_PATTERNS), for `method.query=agnostic`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvbench.errors import KVBenchError
from kvbench.tasks.ruler_data import TASKS, TEMPLATES, generate

SOURCES = ("generate", "kvpress")
# kvpress's evaluation/benchmarks/ruler/create_huggingface_dataset.py: where each task's question starts
QUESTION_PATTERNS = {
    "niah": re.compile(r"What (?:is|are all) the special magic"),
    "vt": re.compile(r"Question: Find all variables that are assigned the value"),
    "cwe": re.compile(r"Question: What are the 10 most common words in the above list\?"),
    "fwe": re.compile(r"Question: Do not provide any explanation\."),
    "qa": re.compile(r"Answer the question based on the given documents\."),
}
CONTROL = re.compile(r"[\x00-\x1f]")


def family(task: str) -> str:
    return task.split("_")[0]


def question_of(task: str, text: str) -> str:
    """The end of `text` from the last match of the task's question pattern."""
    matches = list(QUESTION_PATTERNS[family(task)].finditer(text))
    return text[matches[-1].start():] if matches else ""


def postprocess(prediction: str, source: str = "generate") -> str:
    """evaluate.py's postprocess_pred (control characters -> newlines); kvpress removes them."""
    return CONTROL.sub("\n" if source == "generate" else "", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    return sum(1.0 if r.lower() in prediction.lower() else 0.0 for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    return max(1.0 if r.lower() in prediction.lower() else 0.0 for r in references)


def task_score(scores: list[float]) -> float:
    """RULER's round(sum / n * 100, 2)."""
    return round(sum(scores) / len(scores) * 100, 2)


@dataclass
class Ruler:
    tasks: list[str] | None = None  # null: all 13, in RULER's order
    context_tokens: int = 4096  # RULER's max_seq_length: prompt (answer prefix included) + tokens to generate
    num_samples: int = 500  # per task
    seed: int = 42  # RULER's random_seed
    essay: str = "britannica"  # the essay haystack: britannica | a text file | RULER's PaulGrahamEssays.json
    qa_dir: str | None = None  # RULER's squad.json / hotpotqa.json; null: the hub cache through datasets
    source: str = "generate"  # generate | kvpress (its pre-built set at context_tokens)
    kvpress_data: str = "simonjegou/ruler"  # kvpress's hub id, or a local .parquet / .jsonl / folder
    chat: bool = True  # RULER's input in the model's chat format; false: RULER's base template

    name: ClassVar[str] = "ruler"

    def __post_init__(self):
        self.tasks = list(self.tasks) if self.tasks else list(TASKS)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise KVBenchError(f"task.tasks has {', '.join(unknown)}; RULER's tasks are: {', '.join(TASKS)}")
        if self.source not in SOURCES:
            raise KVBenchError(f"task.source={self.source} is not one of: {', '.join(SOURCES)}")
        if self.context_tokens <= 0 or self.num_samples <= 0:
            raise KVBenchError("task.context_tokens and task.num_samples must be > 0")

    @property
    def label(self) -> str:
        return f"ruler_{self.context_tokens}" + ("_kvpress" if self.source == "kvpress" else "")

    def essay_text(self) -> str:
        if self.essay == "britannica":
            from kvbench.tasks.prose import text_path

            return text_path().read_text(encoding="utf-8")
        path = Path(self.essay).expanduser()
        if not path.is_file():
            raise KVBenchError(f"task.essay={self.essay}: not britannica nor a file (a text, or RULER's "
                               "PaulGrahamEssays.json)")
        text = path.read_text(encoding="utf-8")
        return json.loads(text)["text"] if path.suffix == ".json" else text

    def samples(self, tokenizer) -> list[dict]:
        if self.source == "kvpress":
            return self._kvpress_samples()
        out = []
        essay = self.essay_text() if any(TASKS[t][1].get("type_haystack") == "essay" for t in self.tasks) else None
        for task in self.tasks:
            extra = {"essay": essay}
            if TASKS[task][0] == "qa":
                from kvbench.tasks.ruler_qa import load_qa

                extra["qa_data"] = load_qa(TASKS[task][1]["dataset"], self.qa_dir)
            for i, r in enumerate(generate(task, tokenizer, self.context_tokens, self.num_samples, self.seed, **extra)):
                out.append({"id": f"{task}-{i}", "task": task, "input": r["input"], "answer_prefix": r["answer_prefix"],
                            "outputs": r["outputs"], "length": r["length"], "question": question_of(task, r["input"]),
                            "max_new_tokens": TEMPLATES[TASKS[task][0]][2]})
        return out

    def _kvpress_samples(self) -> list[dict]:
        from kvbench.tasks.ruler_qa import load_kvpress

        counts: dict[str, int] = {}
        out = []
        for row in load_kvpress(self.kvpress_data, self.context_tokens):
            if row["task"] not in self.tasks or counts.get(row["task"], 0) >= self.num_samples:
                continue
            i = counts[row["task"]] = counts.get(row["task"], 0) + 1
            out.append({"id": f"{row['task']}-{i - 1}", "task": row["task"], "input": row["context"] + row["question"],
                        "answer_prefix": row["answer_prefix"], "outputs": row["outputs"], "length": None,
                        "question": row["question"], "max_new_tokens": row["max_new_tokens"]})
        order = {t: k for k, t in enumerate(self.tasks)}
        return sorted(out, key=lambda s: order[s["task"]])  # stable: each task's rows in the file's order

    def limit_samples(self, samples: list[dict], limit: int) -> list[dict]:
        """The first `limit` samples of each task."""
        seen: dict[str, int] = {}
        kept = []
        for sample in samples:
            seen[sample["task"]] = seen.get(sample["task"], 0) + 1
            if seen[sample["task"]] <= limit:
                kept.append(sample)
        return kept

    def prepare(self, sample: dict, generator):
        return generator.prompt(sample["input"], sample["max_new_tokens"], chat=self.chat, question=sample["question"],
                                answer_prefix=sample["answer_prefix"])

    def evaluate(self, sample: dict, generator) -> dict:
        prompt = self.prepare(sample, generator)
        return self.record(sample, prompt, generator.run(prompt), generator)

    def record(self, sample: dict, prompt, generation, generator) -> dict:
        prediction = postprocess(generator.decode(generation.tokens[0]), self.source)
        match = string_match_part if family(sample["task"]) == "qa" else string_match_all
        return {
            "id": sample["id"],
            "task": sample["task"],
            "prediction": prediction,
            "answers": sample["outputs"],
            "length": sample["length"],
            "score": match(prediction, sample["outputs"]),
            **generation.record_fields(),
        }

    def score(self, records: list[dict]) -> dict[str, float]:
        by_task: dict[str, list[float]] = {}
        for r in records:
            by_task.setdefault(r["task"], []).append(r["score"])
        return {t: task_score(by_task[t]) for t in self.tasks if t in by_task}
