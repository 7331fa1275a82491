"""Synthetic tasks that need no download: passkey and multi-key retrieval, and the text they hide in.

Passkey retrieval (Mohtashami & Jaggi, arXiv:2305.16300): a random number is
hidden at a seeded depth inside seeded filler text, and asked for at the end.
Multi-key retrieval hides several named keys and asks for one of them. A
sample is correct when the first number in the answer equals the key.
Everything is seeded by (`seed`, sample index), so sample i is the same text
on every run and on every machine.

The filler is a small seeded grammar: local structure a language model can
learn, no information about the keys. `training_document` builds the same
kinds of documents at an exact token length for `scripts/train_tiny.py`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from kvbench.errors import KVBenchError
from kvbench.tasks.metrics import task_score

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"

_SUBJECTS = ["The grass", "The sky", "The sun", "A river", "The old road", "The wind", "A small boat", "The hill"]
_VERBS = ["looks", "seems", "stays", "turns", "grows"]  # no "is": "... key is" stays unambiguous
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


MULTI_INTRO = "There are several keys hidden in this text. Find the one I ask for.\n"
MULTI_NEEDLE = "The key for the {name} is {key}.\n"
MULTI_QUESTION = "\nWhat is the key for the {name}? The key for the {name} is"
KEY_NAMES = [
    "lantern", "meadow", "harbor", "castle", "engine", "mirror", "garden", "bridge", "forest", "island",
    "market", "station", "valley", "candle", "basket", "thunder", "copper", "silver", "window", "letter",
]


def filler_text(rng: random.Random, n_chars: int) -> str:
    """Exactly `n_chars` characters of seeded filler (the last sentence may be cut)."""
    parts, size = [], 0
    while size < n_chars:
        (sentence,) = filler_sentences(rng, 1)
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:n_chars]


def random_key(rng: random.Random, digits: int = 5, distinct: bool = True) -> str:
    """A `digits`-digit key without a leading zero; with `distinct`, no digit repeats (so each digit of
    the key names the next one: a small model can copy it by one-token induction)."""
    if not distinct:
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    first = rng.choice("123456789")
    return first + "".join(rng.sample([d for d in "0123456789" if d != first], digits - 1))


def training_document(kind: str, rng: random.Random, n_chars: int) -> tuple[str, int]:
    """A document of exactly `n_chars` characters (ASCII, so bytes) and where its answer starts (-1: none).

    kind: `passkey` (the Passkey task's format), `multikey` (several named keys, one asked for),
    `copy` (a random string, filler, the same string again: the answer), `repeat` (random characters
    twice over: every repeated token is an answer, the quickest way to grow induction heads), or
    `text` (filler only).
    """
    if kind == "text":
        return filler_text(rng, n_chars), -1
    if kind == "repeat":  # random characters, then the same again: every token of the repeat is a target
        half = (n_chars + 1) // 2
        first = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(half))
        return first + first[: n_chars - half], half + 1
    if kind == "copy":
        alphabet = "0123456789"  # filler has no digits: the copy is unambiguous, as a passkey is
        marked = "[" + "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 24))) + "]"
        room = n_chars - 2 * len(marked) - 1
        cut = rng.randint(0, room)
        filler = filler_text(rng, room)
        text = filler[:cut] + marked + filler[cut:] + "\n" + marked[0]
        return text + marked[1:], len(text)
    if kind == "passkey":
        key = random_key(rng)
        head, needle, question = INTRO, NEEDLE.format(key=key), QUESTION
        needles = [needle]
    elif kind == "multikey":
        names = rng.sample(KEY_NAMES, rng.randint(2, 4))
        keys = [random_key(rng) for _ in names]
        key, head, question = keys[0], MULTI_INTRO, MULTI_QUESTION.format(name=names[0])
        needles = [MULTI_NEEDLE.format(name=n, key=k) for n, k in zip(names, keys)]
        while len(needles) > 1 and sum(map(len, needles)) + len(question) + 8 > n_chars:
            needles.pop()  # a short document holds fewer keys (the asked one stays)
        rng.shuffle(needles)
    else:
        raise ValueError(f"unknown document kind {kind!r}")
    answer = f" {key}."
    room = n_chars - len(head) - sum(map(len, needles)) - len(question) - len(answer)
    if room < 0:  # a short document: no intro
        head, room = "", room + len(head)
    if room < 0:
        raise ValueError(f"{n_chars} characters cannot hold a {kind} document")
    filler = filler_text(rng, room)
    cuts = sorted(rng.randint(0, room) for _ in needles)
    body, last = [], 0
    for cut, needle in zip(cuts, needles):
        body += [filler[last:cut], needle]
        last = cut
    body.append(filler[last:])
    text = head + "".join(body) + question
    return text + answer, len(text)


def fill_sentences(rng: random.Random, tokenizer, room: int) -> list[str]:
    """Seeded filler sentences, as many as fit in `room` tokens (not counting the tokenizer's BOS)."""
    empty = len(tokenizer("").input_ids)
    sentences, used = [], 0
    while True:
        (sentence,) = filler_sentences(rng, 1)
        cost = len(tokenizer(sentence).input_ids) - empty
        if used + cost > room:
            return sentences
        sentences.append(sentence)
        used += cost


FILLERS = ("grammar", "prose")


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
    distinct_digits: bool = True  # no digit repeats within a key
    max_new_tokens: int = 8
    filler: str = "grammar"  # grammar: the seeded filler grammar | prose: real English text (tasks/prose.py)
    chat: bool = True  # wrap the prompt in the model's chat format; false: plain completion (base-model passkey)
    seed: int = 0

    name: ClassVar[str] = "passkey"

    def __post_init__(self):
        if self.num_samples <= 0 or self.context_tokens <= 0 or self.digits <= 0:
            raise KVBenchError("task.num_samples, task.context_tokens and task.digits must be > 0")
        if self.distinct_digits and self.digits > 10:
            raise KVBenchError(f"task.digits={self.digits}: distinct digits allow at most 10; set task.distinct_digits=false")
        if not 0.0 <= self.depth_min <= self.depth_max <= 1.0:
            raise KVBenchError("task.depth_min and task.depth_max must satisfy 0 <= min <= max <= 1")
        if self.filler not in FILLERS:
            raise KVBenchError(f"task.filler={self.filler} is not one of: {', '.join(FILLERS)}")

    @property
    def label(self) -> str:
        """The run folder and score column: the task name, with `_prose` for the real-text haystack."""
        return self.name if self.filler == "grammar" else f"{self.name}_{self.filler}"

    def fill(self, rng: random.Random, tokenizer, room: int) -> list[str]:
        """Haystack pieces that fit in `room` tokens; the needle goes between two of them."""
        if self.filler == "prose":
            from kvbench.tasks.prose import prose_pieces

            return prose_pieces(rng, tokenizer, room)
        return fill_sentences(rng, tokenizer, room)

    def make_sample(self, index: int, tokenizer) -> dict:
        rng = random.Random(f"passkey/{self.seed}/{index}")
        key = random_key(rng, self.digits, self.distinct_digits)
        depth = rng.uniform(self.depth_min, self.depth_max)
        needle = NEEDLE.format(key=key)

        fixed = len(tokenizer(INTRO + needle + QUESTION).input_ids)
        if fixed > self.context_tokens:
            raise KVBenchError(f"task.context_tokens={self.context_tokens} is shorter than the passkey prompt ({fixed})")
        sentences = self.fill(rng, tokenizer, self.context_tokens - fixed)
        cut = round(depth * len(sentences))
        prompt = INTRO + "".join(sentences[:cut]) + needle + "".join(sentences[cut:]) + QUESTION
        return {"id": f"passkey-{index}", "prompt": prompt, "question": QUESTION, "answer": key,
                "depth": round(depth, 4)}

    def samples(self, tokenizer) -> list[dict]:
        return [self.make_sample(i, tokenizer) for i in range(self.num_samples)]

    def prepare(self, sample: dict, generator):
        return generator.prompt(sample["prompt"], self.max_new_tokens, chat=self.chat, question=sample["question"])

    def evaluate(self, sample: dict, generator) -> dict:
        prompt = self.prepare(sample, generator)
        return self.record(sample, prompt, generator.run(prompt), generator)

    def record(self, sample: dict, prompt, generation, generator) -> dict:
        text = generator.decode(generation.tokens[0])
        correct = first_number(text) == sample["answer"]
        return {
            "id": sample["id"],
            "task": self.label,
            "prediction": text,
            "answers": [sample["answer"]],
            "depth": sample["depth"],
            "score": float(correct),
            **generation.record_fields(),
        }

    def score(self, records: list[dict]) -> dict[str, float]:
        return {self.label: task_score([r["score"] for r in records])}


@dataclass
class MultiKey(Passkey):
    """Several named keys at seeded depths; the question asks for one of them."""

    num_keys: int = 4

    name: ClassVar[str] = "multikey"

    def make_sample(self, index: int, tokenizer) -> dict:
        rng = random.Random(f"multikey/{self.seed}/{index}")
        names = rng.sample(KEY_NAMES, self.num_keys)
        keys = [random_key(rng, self.digits, self.distinct_digits) for _ in names]
        ask = rng.randrange(self.num_keys)
        needles = [MULTI_NEEDLE.format(name=n, key=k) for n, k in zip(names, keys)]
        question = MULTI_QUESTION.format(name=names[ask])
        fixed = len(tokenizer(MULTI_INTRO + "".join(needles) + question).input_ids)
        if fixed > self.context_tokens:
            raise KVBenchError(f"task.context_tokens={self.context_tokens} is shorter than the prompt ({fixed})")
        sentences = self.fill(rng, tokenizer, self.context_tokens - fixed)
        cuts = sorted(rng.randint(round(self.depth_min * len(sentences)), round(self.depth_max * len(sentences)))
                      for _ in needles)
        body, last = [], 0
        for cut, needle in zip(cuts, needles):
            body += sentences[last:cut] + [needle]
            last = cut
        body += sentences[last:]
        prompt = MULTI_INTRO + "".join(body) + question
        depth = cuts[ask] / max(1, len(sentences))
        return {"id": f"multikey-{index}", "prompt": prompt, "question": question, "answer": keys[ask],
                "depth": round(depth, 4)}
