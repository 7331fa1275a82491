"""Needle in a haystack over a grid of context lengths x needle depths, scored per cell (the heatmap).

The test as KVCache-Factory's `run_needle_in_haystack.py` runs it (after gkamradt's LLMTest_NeedleInAHaystack),
rule by rule:
- the haystack text is read whole and repeated until it holds at least the longest length in tokens, then
  cut to the cell's length (`encode_and_trim`);
- the needle goes in with `final_context_length_buffer` (200) tokens of room: the text is cut to
  length - 200 - needle tokens, the needle inserted at int(depth% x tokens), moved back to just after the
  nearest period; depth 100 appends it (`insert_needle`); tokens are counted without special tokens;
- the prompt is the reference's own raw format (no chat template unless `chat`):
  `<|im_start|> This is a very long story book: <book> {context} </book>.\\n Based on the content of the book,
  Question: {question}\\nAnswer:`; greedy, 30 new tokens, stopping at EOS or a newline; the answer stripped;
- the cell's score is what `scripts/scripts_needle/visualize.py` draws: the share of the expected answer's
  words (lower case, split on spaces) found among the response's words; the reference's ROUGE-1 F x 10
  (rouge_score, stemmed) is kept in each record as `rouge1_f`;
- depths: round(linspace(0, 100, 10)) as the reference's `linear` type.

What differs: the Paul Graham essays are not downloadable here, so the haystack is kvbench's public-domain
prose (the 1911 Britannica article, `haystack: britannica`), the seeded filler grammar (`grammar`, no
download), or any folder of .txt files read in sorted order as the reference reads its essays (a path:
`data/PaulGrahamEssays` where you have them). A "period token" is any token whose text ends in a period
(the reference lists them per tokenizer by hand).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from kvbench.errors import KVBenchError
from kvbench.tasks.metrics import task_score

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "The best thing to do in San Francisco is: "
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day."
PROMPT = ("<|im_start|> This is a very long story book: <book> {context} </book>.\n Based on the content of the book, "
          "Question: {question}\nAnswer:")


def depth_grid(intervals: int, low: float = 0, high: float = 100) -> list[int]:
    """round(linspace(low, high, intervals)), the reference's `linear` depths (numpy rounds half to even)."""
    if intervals == 1:
        return [round(low)]
    return [round(low + (high - low) * i / (intervals - 1)) for i in range(intervals)]


def word_recall(response: str, answer: str) -> float:
    """visualize.py's score: |answer words ∩ response words| / |answer words|, lower case, split on spaces."""
    expected = set(answer.lower().split())
    return len(set(response.lower().split()) & expected) / len(expected)


def rouge1_f(needle: str, response: str) -> float:
    """run_needle_in_haystack.py's score: ROUGE-1 F (rouge_score, stemmed) x 10; 0 for an empty response."""
    if not response:
        return 0.0
    return _scorer().score(needle, response)["rouge1"].fmeasure * 10


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


@dataclass
class Niah:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])  # context tokens (the book, needle included)
    depths: list[float] | None = None  # depth percents; null: depth_grid(depth_intervals)
    depth_intervals: int = 10
    haystack: str = "britannica"  # britannica | grammar | a folder of .txt files
    needle: str = NEEDLE
    question: str = QUESTION
    answer: str = ANSWER  # the words the score looks for
    buffer: int = 200  # the reference's final_context_length_buffer
    max_new_tokens: int = 30
    chat: bool = False  # false: the reference's raw prompt; true: inside the model's chat format
    seed: int = 0  # the grammar haystack's seed

    name: ClassVar[str] = "niah"

    def __post_init__(self):
        self.lengths = [int(n) for n in self.lengths]
        if not self.lengths or min(self.lengths) <= self.buffer:
            raise KVBenchError(f"task.lengths={self.lengths} must each exceed task.buffer={self.buffer} tokens")
        self.depths = [float(d) for d in (self.depths if self.depths is not None else depth_grid(self.depth_intervals))]
        if not self.depths or not all(0 <= d <= 100 for d in self.depths):
            raise KVBenchError(f"task.depths={self.depths} must be percents in [0, 100]")
        self._tokens: dict[int, list[int]] = {}

    # -- the haystack
    def text(self) -> str:
        if self.haystack == "britannica":
            from kvbench.tasks.prose import text_path

            return text_path().read_text(encoding="utf-8")
        if self.haystack == "grammar":
            from kvbench.tasks.synthetic import filler_text

            return filler_text(random.Random(f"niah/{self.seed}"), 200_000)
        folder = Path(self.haystack).expanduser()
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise KVBenchError(f"task.haystack={self.haystack}: not britannica, grammar, nor a folder of .txt files")
        return "".join(f.read_text(encoding="utf-8") for f in files)

    def haystack_tokens(self, tokenizer) -> list[int]:
        """The haystack read again and again until it holds the longest length (the reference's read_context_files)."""
        key = id(tokenizer)
        if key not in self._tokens:
            text, once = "", self.text()
            tokens: list[int] = []
            while len(tokens) < max(self.lengths):
                text += once
                tokens = tokenizer.encode(text, add_special_tokens=False)
            self._tokens[key] = tokens
        return self._tokens[key]

    def context(self, tokenizer, length: int, depth: float) -> str:
        """The haystack cut to `length` tokens with the needle at `depth` percent (encode_and_trim, insert_needle)."""
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        haystack = decode(self.haystack_tokens(tokenizer)[:length])
        tokens = tokenizer.encode(haystack, add_special_tokens=False)
        needle = tokenizer.encode(self.needle, add_special_tokens=False)
        room = length - self.buffer
        if len(tokens) + len(needle) > room:
            tokens = tokens[: room - len(needle)]
        if depth == 100:
            return decode(tokens + needle)
        at = int(len(tokens) * (depth / 100))
        while at > 0 and not decode(tokens[at - 1 : at]).endswith("."):
            at -= 1
        return decode(tokens[:at] + needle + tokens[at:])

    # -- the task
    def samples(self, tokenizer) -> list[dict]:
        out = []
        for length in self.lengths:
            for depth in self.depths:
                prompt = PROMPT.format(context=self.context(tokenizer, length, depth), question=self.question)
                out.append({"id": f"niah-{length}-{depth:g}", "prompt": prompt, "context_length": length,
                            "depth_percent": depth})
        return out

    def prepare(self, sample: dict, generator):
        newline = generator.tokenizer.encode("\n", add_special_tokens=False)[-1]
        question = PROMPT.split("{context}")[1].format(question=self.question)
        return generator.prompt(sample["prompt"], self.max_new_tokens, chat=self.chat, stop_token_ids=[newline],
                                question=question)

    def evaluate(self, sample: dict, generator) -> dict:
        prompt = self.prepare(sample, generator)
        return self.record(sample, prompt, generator.run(prompt), generator)

    def record(self, sample: dict, prompt, generation, generator) -> dict:
        response = generator.decode(generation.tokens[0]).strip()
        return {
            "id": sample["id"],
            "task": self.name,
            "prediction": response,
            "answers": [self.answer],
            "context_length": sample["context_length"],
            "depth_percent": sample["depth_percent"],
            "score": word_recall(response, self.answer),
            "rouge1_f": round(rouge1_f(self.needle, response), 4),
            **generation.record_fields(),
        }

    def score(self, records: list[dict]) -> dict[str, float]:
        return {self.name: task_score([r["score"] for r in records])}

    def score_details(self, records: list[dict]) -> dict:
        """The heatmap: mean score x 100 per context length and depth ({length: {depth: score}})."""
        cells: dict[str, dict[str, list[float]]] = {}
        for r in records:
            cells.setdefault(str(r["context_length"]), {}).setdefault(f"{r['depth_percent']:g}", []).append(r["score"])
        return {"grid": {n: {d: task_score(v) for d, v in row.items()} for n, row in cells.items()}}
