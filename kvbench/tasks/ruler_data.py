"""RULER's sample generation (Hsieh et al., arXiv:2404.06654), draw for draw as NVIDIA/RULER's scripts make them.

Each `make_<task>` function here is the generation of `scripts/data/synthetic/<script>.py` (commit c3f5e3b) run
by `scripts/data/prepare.py` with `--model_template_type base`: same seed, same tokenizer and same target length
give the same records, field by field (tests/unit/test_ruler.py holds samples RULER's own scripts wrote). The
rules carried over:
- one `random.Random(seed)` and one `numpy.random.RandomState(seed)` per task file, as `random.seed(seed)` /
  `np.random.seed(seed)` at the top of each script; every throw-away sample of the size search (a first estimate,
  then a binary search with a fresh sample per probe, then the per-sample shrinking loop) draws from them, in the
  scripts' order; the shuffles that the scripts do with a fresh `random.Random(seed)` do so here too;
- lengths count `tokenizer.tokenize()` tokens (no BOS) of the whole prompt, answer prefix included, plus the
  task's tokens_to_generate; a prompt must be at most `max_seq_length`;
- the templates and answer prefixes of `scripts/data/synthetic/constants.py`, the task settings of
  `scripts/synthetic.yaml`, the needle "One of the special magic {type_needle_v} for {key} is: {value}.", the
  noise haystack, wonderwords 2.2.0's word lists (kvbench/tasks/data/ruler_words.json), niah keys from
  sorted(set(adjective-noun pairs)), 7-digit numbers, UUIDs from getrandbits(128), the single-needle wording
  ("Some" -> "A", "are all" -> "is", "are" -> "is", "answers" -> "answer", "numbers" -> "number"),
  variable-tracking chains with their in-context example, cwe's few-shot example, fwe's Zipf counts
  (num_words * k^-alpha / zeta(alpha)) over a coded vocabulary;
- each record: `input` (without the answer prefix), `outputs`, `length`, `length_w_model_temp`,
  `answer_prefix`, and niah's `index` (the answer's character offset) and `token_position_answer`.

Where kvbench differs, and why:
- the essay haystack: the Paul Graham essays are not downloadable here; `essay` is any text (kvbench passes the
  1911 Britannica article, or a RULER `PaulGrahamEssays.json` you have) and its sentences are split at . ! ?
  followed by white space (NLTK's punkt data is not installable from a package registry). With the essays and
  punkt, RULER's samples differ from these;
- a prompt that cannot fit (RULER's loop never ends: vt with a byte-level tokenizer under 500 tokens) is one
  error; cwe beyond the 8,169 wonderwords (RULER then reads english_words.json, a Git LFS file) is one error.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
from functools import cache
from pathlib import Path

import numpy as np

from kvbench.errors import KVBenchError

TEMPLATES = {  # scripts/data/synthetic/constants.py: (template, answer prefix, tokens_to_generate)
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ", 30),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:", 120),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:", 50),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:", 32),
}
# scripts/synthetic.yaml: each of the 13 tasks, its script and settings, in RULER's order
TASKS = {
    "niah_single_1": ("niah", dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers")),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers")),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids")),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=4)),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers")),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids")),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_v=4)),
    "niah_multiquery": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_q=4)),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)): no .5 among them
DOCUMENT = "Document {i}:\n{document}"
MAX_RETRIES = 200  # draws at the smallest size before kvbench gives up (RULER's scripts never do)


@cache
def word_lists() -> dict[str, list[str]]:
    return json.loads((Path(__file__).parent / "data" / "ruler_words.json").read_text())


@cache
def key_words() -> list[str]:
    """niah's word keys, sorted(set(f"{adjective}-{noun}")): 6.2 million strings, built family by family in
    a second rather than sorted whole (15 s). An adjective and those that extend it with a hyphen ("wide",
    "wide-eyed") form a family whose keys interleave: they are sorted together; any two families' keys differ
    before their first hyphen-free end, so families follow each other in the order of root + "-"."""
    lists = word_lists()
    adjectives, nouns = sorted(set(lists["adjectives"])), sorted(set(lists["nouns"]))
    families: dict[str, list[str]] = {}
    for adj in adjectives:
        root = min((a for a in adjectives if adj.startswith(a + "-")), key=len, default=adj)
        families.setdefault(root, []).append(adj)
    keys: list[str] = []
    for root in sorted(families, key=lambda r: r + "-"):
        members = families[root]
        if len(members) == 1:
            keys += [f"{root}-{noun}" for noun in nouns]
        else:
            keys += sorted({f"{adj}-{noun}" for adj in members for noun in nouns})
    return keys


def template(kind: str) -> str:
    """The prompt template prepare.py passes to a script: the base model template, then the answer prefix."""
    text, prefix, _ = TEMPLATES[kind]
    return text + prefix


def split_prefix(kind: str, text: str) -> tuple[str, str]:
    """(input, answer prefix): the text split at the last occurrence of the prefix's first 10 characters."""
    at = text.rfind(TEMPLATES[kind][1][:10])
    return text[:at], text[at:]


def essay_words(text: str) -> list[str]:
    """RULER's essay haystack: the text with white space runs made one space, split on spaces."""
    return re.sub(r"\s+", " ", text).split(" ")


def sentences(text: str) -> list[str]:
    """Sentences split at . ! ? followed by white space (RULER: NLTK punkt's sent_tokenize)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


class Sizer:
    """A task's token counter and the size search its script runs."""

    def __init__(self, tokenizer, task: str):
        self.tokenizer, self.task = tokenizer, task

    def count(self, text: str) -> int:
        return len(self.tokenizer.tokenize(text))

    def search(self, make, incremental: int, max_len: int, extra: int, factor: int = 3, floor_div: bool = False,
               estimate: int | None = None) -> int:
        """The largest haystack size whose prompt is <= max_len tokens (extra: tokens added to each count), by
        the scripts' estimate then binary search; `incremental` when none fits."""
        probe = estimate or incremental
        per_unit = self.count(make(probe)[0]) / probe
        if floor_div:  # cwe: int(max // per) * 2
            upper = int(max_len // per_unit) * factor
        else:
            upper = int((max_len / per_unit) * factor)
        lower, upper, best = incremental, max(upper, incremental * 2), None
        while lower <= upper:
            mid = (lower + upper) // 2
            if self.count(make(mid)[0]) + extra <= max_len:
                best, lower = mid, mid + 1
            else:
                upper = mid - 1
        return best if best is not None else incremental

    def fit(self, make, size: int, incremental: int, max_len: int, extra: int):
        """A sample at `size`, shrunk by `incremental` until it fits (each try draws a new one), as the scripts'
        retry loop: at or below `incremental` the scripts draw again at the same size for ever; kvbench gives up
        after MAX_RETRIES draws with one error."""
        retries, length = 0, None
        while True:
            try:
                out = make(size)
                length = self.count(out[0]) + extra
                if length <= max_len:
                    return out, length
            except ValueError:  # a draw that cannot be made (fewer documents than a question's own): RULER's
                length = None   # bare except steps down the same way
            if size > incremental:
                size -= incremental
            elif (retries := retries + 1) > MAX_RETRIES:
                got = f"gives {length} tokens > {max_len}" if length else "cannot hold a sample's own documents"
                raise KVBenchError(f"RULER {self.task}: even the smallest haystack {got} with this tokenizer (RULER's "
                                   "script retries for ever); raise task.context_tokens")


# ----------------------------------------------------------------------------- niah.py


def make_niah(task: str, tokenizer, max_seq_length: int, num_samples: int, seed: int = 42, essay: str | None = None,
              type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=1, num_needle_v=1,
              num_needle_q=1) -> list[dict]:
    rng = random.Random(seed)
    num_needle_k = max(num_needle_k, num_needle_q)
    keys_words = key_words()
    if type_haystack == "essay":
        if essay is None:
            raise KVBenchError(f"RULER {task} needs an essay haystack: set task.essay (britannica or a file)")
        haystack = essay_words(essay)
    else:
        haystack = NOISE if type_haystack == "noise" else NEEDLE
    full_template = template("niah")

    def draw(kind):
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return rng.choice(keys_words)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def make(num_haystack):
        keys, values, needles = [], [], []
        for _ in range(num_needle_k):
            keys.append(draw(type_needle_k))
            value = []
            for _ in range(num_needle_v):
                value.append(draw(type_needle_v))
                needles.append(NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(seed).shuffle(needles)
        if type_haystack == "essay":
            repeats = (num_haystack + len(haystack) - 1) // len(haystack)
            text = " ".join((haystack * repeats)[:num_haystack])
            sents = sentences(text)
            cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if type_haystack == "noise":
                lines = [haystack] * num_haystack
            else:
                lines = [haystack.format(type_needle_v=type_needle_v, key=draw(type_needle_k),
                                         value=draw(type_needle_v)) for _ in range(num_haystack)]
            for index, element in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
                lines.insert(index, element)
            context = "\n".join(lines)
        picked = rng.sample(range(num_needle_k), num_needle_q)
        queries = [keys[i] for i in picked]
        answers = [a for i in picked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        text_template, kind_v = full_template, type_needle_v
        if num_needle_q * num_needle_v == 1:
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                text_template = text_template.replace(old, new)
            kind_v = kind_v[:-1]
        return text_template.format(type_needle_v=kind_v, context=context, query=query), answers

    incremental = {"essay": 500, "noise": 25, "needle": 25}[type_haystack]
    if type_haystack != "essay" and max_seq_length < 4096:
        incremental = 5
    sizer, tokens = Sizer(tokenizer, task), TEMPLATES["niah"][2]
    size = sizer.search(make, incremental, max_seq_length, tokens)
    records = []
    for _ in range(num_samples):
        (text, answers), length = sizer.fit(make, size, incremental, max_seq_length, tokens)
        text, prefix = split_prefix("niah", text)
        at = text.find(answers[0])
        records.append({"index": at, "input": text, "outputs": answers, "length": length,
                        "length_w_model_temp": length, "answer_prefix": prefix,
                        "token_position_answer": sizer.count(text[:at])})
    return records


# ----------------------------------------------------------------------------- variable_tracking.py


def make_variable_tracking(task: str, tokenizer, max_seq_length: int, num_samples: int, seed: int = 42,
                           essay: str | None = None, type_haystack="noise", num_chains=1, num_hops=4) -> list[dict]:
    if type_haystack != "noise":
        raise KVBenchError("RULER vt: kvbench generates the noise haystack only (RULER's synthetic.yaml setting)")
    rng, nrng = random.Random(seed), np.random.RandomState(seed)
    sizer, (text_t, prefix_t, tokens) = Sizer(tokenizer, task), TEMPLATES["variable_tracking"]
    full_template = text_t + prefix_t

    def chains_of(icl: bool):
        k, hops = (3, min(10, num_hops)) if icl else (5, num_hops)
        names = ["".join(rng.choices(string.ascii_uppercase, k=k)).upper() for _ in range((hops + 1) * num_chains)]
        while len(set(names)) < num_chains * (hops + 1):
            names.append("".join(rng.choices(string.ascii_uppercase, k=k)).upper())
        out_vars, out_chains = [], []
        for i in range(0, len(names), hops + 1):
            these = names[i:i + hops + 1]
            out_vars.append(these)
            chain = [f"VAR {these[0]} = 12345" if icl else f"VAR {these[0]} = {nrng.randint(10000, 99999)}"]
            chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)]
            out_chains.append(chain)
        return out_vars, out_chains

    def make(num_noises, icl):
        names, chains = chains_of(icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE] * num_noises
        for chain in chains:
            for pos, j in zip(sorted(rng.sample(range(len(lines)), len(chain))), range(len(chain))):
                lines.insert(pos + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        return full_template.format(context=context, query=value, num_v=num_hops + 1), names[0]

    def randomize(example):
        for item in example.strip().split()[-num_hops - 1:]:
            example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))).upper())
        return example.replace("12345", str(nrng.randint(10000, 99999)))

    # the in-context example: one sample at 500 tokens, no tokens to generate, three-letter names
    size = sizer.search(lambda n: make(n, True), 5, 500, 0)
    (icl_text, icl_answer), _ = sizer.fit(lambda n: make(n, True), size, 5, 500, 0)
    example = icl_text + " " + " ".join(icl_answer) + "\n"
    example_tokens = sizer.count(example)
    incremental = 5 if max_seq_length < 4096 else 10
    size = sizer.search(lambda n: make(n, False), incremental, max_seq_length, example_tokens + tokens)

    def with_example(n):
        text, answer = make(n, False)
        cut = text.index(text_t[:20])
        return text[:cut] + randomize(example) + "\n" + text[cut:], answer

    records = []
    for index in range(num_samples):
        (text, answer), length = sizer.fit(with_example, size, incremental, max_seq_length, tokens)
        text, prefix = split_prefix("variable_tracking", text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length,
                        "length_w_model_temp": length, "answer_prefix": prefix})
    return records


# ----------------------------------------------------------------------------- common_words_extraction.py


def make_common_words_extraction(task: str, tokenizer, max_seq_length: int, num_samples: int, seed: int = 42,
                                 essay: str | None = None, freq_cw=30, freq_ucw=3, num_cw=10,
                                 num_fewshot=1) -> list[dict]:
    rng = random.Random(seed)
    lists = word_lists()
    words = sorted(set(lists["nouns"] + lists["adjectives"] + lists["verbs"]))
    random.Random(seed).shuffle(words)
    full_template = template("common_words_extraction")
    tokens = TEMPLATES["common_words_extraction"][2]

    def example(num_words, common_repeats, uncommon_repeats, common_nums):
        if num_words > len(words):
            raise KVBenchError(f"RULER cwe: {num_words} distinct words needed, more than the {len(words)} "
                               "wonderwords (RULER then reads its english_words.json, not shipped): lower "
                               "task.context_tokens")
        chosen = rng.sample(words, num_words)
        common, uncommon = chosen[:common_nums], chosen[common_nums:]
        listed = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(seed).shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common

    def make(num_words):
        shots = []
        small = max_seq_length < 4096
        for _ in range(num_fewshot):
            shots.append(example(20, 3, 1, num_cw) if small else example(40, 10, 3, num_cw))
        context, answer = example(num_words, 6, 1, num_cw) if small else example(num_words, freq_cw, freq_ucw, num_cw)
        shots = [full_template.format(num_cw=num_cw, context=c, query="") + " "
                 + " ".join(f"{i + 1}. {w}" for i, w in enumerate(a)) for c, a in shots]
        return "\n".join(shots) + "\n" + full_template.format(num_cw=num_cw, context=context, query=""), answer

    sizer = Sizer(tokenizer, task)
    size = sizer.search(make, 10, max_seq_length, tokens, factor=2, floor_div=True, estimate=4096)
    records = []
    for index in range(num_samples):
        (text, answer), length = sizer.fit(make, size, 10, max_seq_length, tokens)
        text, prefix = split_prefix("common_words_extraction", text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length,
                        "length_w_model_temp": length, "answer_prefix": prefix})
    return records


# ----------------------------------------------------------------------------- freq_words_extraction.py


def zeta(alpha: float) -> float:
    """Riemann's zeta(alpha) (scipy.special.zeta(alpha) in RULER): pi^2/6 at RULER's alpha 2, else
    Euler-Maclaurin after 20 terms (float64 accuracy)."""
    if alpha == 2.0:
        return math.pi**2 / 6
    n = 20
    head = sum(k**-alpha for k in range(1, n))
    tail = n ** (1 - alpha) / (alpha - 1) + n**-alpha / 2 + alpha * n ** (-alpha - 1) / 12 \
        - alpha * (alpha + 1) * (alpha + 2) * n ** (-alpha - 3) / 720
    return head + tail


def make_freq_words_extraction(task: str, tokenizer, max_seq_length: int, num_samples: int, seed: int = 42,
                               essay: str | None = None, alpha=2.0, coded_wordlen=6, vocab_size=-1) -> list[dict]:
    rng = random.Random(seed)
    full_template = template("freq_words_extraction")
    tokens = TEMPLATES["freq_words_extraction"][2]
    sizer = Sizer(tokenizer, task)
    max_len = max_seq_length - tokens
    vocab_size = max_len // 50 if vocab_size == -1 else vocab_size
    z = zeta(alpha)

    def make(max_len, num_words=-1, incremental=10):
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
        vocab = sorted(set(vocab))
        random.Random(seed).shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise

        def text_of(n):
            counts = (n * (np.arange(1, len(vocab) + 1) ** -alpha) / z).astype(int)
            listed = [w for w, c in zip(vocab, counts) for _ in range(c)]
            random.Random(seed).shuffle(listed)
            return full_template.format(context=" ".join(listed), query=""), vocab[1:4]

        if num_words > 0:
            text, _ = text_of(num_words)
            while sizer.count(text) > max_len:
                num_words -= incremental
                text, _ = text_of(num_words)
        else:
            num_words = max_len // coded_wordlen
            text, _ = text_of(num_words)
            while sizer.count(text) < max_len:
                num_words += incremental
                text, _ = text_of(num_words)
            num_words -= incremental
        text, answer = text_of(num_words)
        return text, answer, num_words

    _, _, words = make(max_len, incremental=max_len // 32)
    records = []
    for index in range(num_samples):
        text, answer, _ = make(max_len, num_words=words, incremental=max_len // 32)
        length = sizer.count(text) + tokens
        text, prefix = split_prefix("freq_words_extraction", text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length,
                        "length_w_model_temp": length, "answer_prefix": prefix})
    return records


# ----------------------------------------------------------------------------- qa.py


def make_qa(task: str, tokenizer, max_seq_length: int, num_samples: int, seed: int = 42, essay: str | None = None,
            dataset: str = "squad", qa_data=None, pre_samples: int = 0) -> list[dict]:
    """`qa_data`: (questions, documents) as RULER's read_squad / read_hotpotqa return them (kvbench.tasks.ruler_qa)."""
    if qa_data is None:
        raise KVBenchError(f"RULER {task} needs its {dataset} data (kvbench.tasks.ruler_qa.load_qa)")
    questions, docs = qa_data
    rng = random.Random(seed)
    full_template = template("qa")
    tokens = TEMPLATES["qa"][2]

    def make(index, num_docs):
        q = questions[index]
        ids, more = q["context"], q.get("more_context", [])
        if num_docs < len(docs):
            if num_docs - len(ids) > len(more):
                extra = [i for i in range(len(docs)) if i not in ids + more]
                chosen = ids + more + rng.sample(extra, max(0, num_docs - len(ids) - len(more)))
            else:
                chosen = ids + rng.sample(more, num_docs - len(ids))
            chosen = [docs[i] for i in chosen]
        else:
            chosen = (docs * ((num_docs + len(docs) - 1) // len(docs)))[:num_docs]
        random.Random(seed).shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
        return full_template.format(context=context, query=q["query"]), q["outputs"]

    if len(questions) < pre_samples + num_samples:
        raise KVBenchError(f"RULER {task}: {len(questions)} answerable questions, fewer than the "
                           f"{pre_samples + num_samples} samples asked; lower task.num_samples")
    sizer = Sizer(tokenizer, task)
    size = sizer.search(lambda n: make(0, n), 10, max_seq_length, tokens)
    records = []
    for index in range(num_samples):
        (text, answer), length = sizer.fit(lambda n, i=index: make(i + pre_samples, n), size, 10, max_seq_length, tokens)
        text, prefix = split_prefix("qa", text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length,
                        "length_w_model_temp": length, "answer_prefix": prefix})
    return records


MAKERS = {"niah": make_niah, "variable_tracking": make_variable_tracking,
          "common_words_extraction": make_common_words_extraction, "freq_words_extraction": make_freq_words_extraction,
          "qa": make_qa}


def generate(task: str, tokenizer, max_seq_length: int, num_samples: int, seed: int = 42, **extra) -> list[dict]:
    """RULER's records for one of the 13 tasks (TASKS), as prepare.py writes them with the base template."""
    if task not in TASKS:
        raise KVBenchError(f"unknown RULER task {task}; choose from: {', '.join(TASKS)}")
    kind, settings = TASKS[task]
    return MAKERS[kind](task, tokenizer, max_seq_length, num_samples, seed, **{**settings, **extra})
