"""Synthetic tasks that need no download: passkey retrieval.

Passkey retrieval (Mohtashami & Jaggi, arXiv:2305.16300): a random number is
hidden at a seeded depth inside seeded filler text, and asked for at the end.
A sample is correct when the first number in the answer equals the key.
Everything is seeded by (`seed`, sample index), so sample i is the same text
on every run and on every machine.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from kvbench import KVBenchError
from kvbench.tasks.metrics import task_score

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"

_SUBJECTS = ["The grass", "The sky", "The sun", "A river", "The old road", "The wind", "A small boat", "The hill"]
_VERBS = ["is", "looks", "seems", "stays", "turns"]
_ADJECTIVES = ["green", "blue", "yellow", "quiet", "long", "bright", "calm", "cold", "wide", "still"]
_TAILS = ["Here we go.", "There and back again.", "The day goes on.", "Nothing happens.", ""]


def filler_sentences(rng: random.Random, count: int) -> list[str]:
    """`count` seeded filler sentences like "The sky is blue. Here we go." """
    out = []
    for _ in range(count):
        tail = rng.choice(_TAILS)
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJECTIVES)}."
        out.append(f"{sentence} {tail}".strip() + " ")
    return out


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@dataclass
class Passkey:
    num_samples: int = 20
    context_tokens: int = 512  # prompt length in tokens (filler is added up to this)
    depth_min: float = 0.0  # needle depth as a fraction of the filler, drawn uniformly per sample
    depth_max: float = 1.0
    digits: int = 5
    max_new_tokens: int = 8
    seed: int = 0

    name: ClassVar[str] = "passkey"

    def __post_init__(self):
        if self.num_samples <= 0 or self.context_tokens <= 0 or self.digits <= 0:
            raise KVBenchError("task.num_samples, task.context_tokens and task.digits must be > 0")
        if not 0.0 <= self.depth_min <= self.depth_max <= 1.0:
            raise KVBenchError("task.depth_min and task.depth_max must satisfy 0 <= min <= max <= 1")

    def make_sample(self, index: int, tokenizer) -> dict:
        rng = random.Random(f"passkey/{self.seed}/{index}")
        key = str(rng.randint(10 ** (self.digits - 1), 10**self.digits - 1))
        depth = rng.uniform(self.depth_min, self.depth_max)
        needle = NEEDLE.format(key=key)

        def n_tokens(text: str) -> int:
            return len(tokenizer(text).input_ids)

        fixed = n_tokens(INTRO + needle + QUESTION)
        if fixed > self.context_tokens:
            raise KVBenchError(f"task.context_tokens={self.context_tokens} is shorter than the passkey prompt ({fixed})")
        sentences, used = [], fixed
        while True:
            (sentence,) = filler_sentences(rng, 1)
            cost = n_tokens(sentence) - n_tokens("")  # without the BOS the tokenizer adds
            if used + cost > self.context_tokens:
                break
            sentences.append(sentence)
            used += cost
        cut = round(depth * len(sentences))
        prompt = INTRO + "".join(sentences[:cut]) + needle + "".join(sentences[cut:]) + QUESTION
        return {"id": f"passkey-{index}", "prompt": prompt, "answer": key, "depth": round(depth, 4)}

    def samples(self, tokenizer) -> list[dict]:
        return [self.make_sample(i, tokenizer) for i in range(self.num_samples)]

    def evaluate(self, sample: dict, generator) -> dict:
        text, generation = generator.complete(sample["prompt"], self.max_new_tokens)
        correct = first_number(text) == sample["answer"]
        return {
            "id": sample["id"],
            "task": self.name,
            "prediction": text,
            "answers": [sample["answer"]],
            "depth": sample["depth"],
            "score": float(correct),
            **generation.record_fields(),
        }

    def score(self, records: list[dict]) -> dict[str, float]:
        return {self.name: task_score([r["score"] for r in records])}
