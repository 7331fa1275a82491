"""Write the small LongBench fixtures the tests use: official schema, deterministic content.

    python papers/smoke/make_longbench_fixtures.py

Every one of the 16 English tasks gets two samples (a short one and one longer
than the tiny model's max prompt, so middle truncation runs); trec_e and
hotpotqa_e get samples in each LongBench-E length bucket.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "longbench"
WORDS = (
    "river stone garden window paper signal harbor lantern meadow engine copper silver winter summer "
    "market station letter bridge forest valley castle island mirror thunder candle basket"
).split()
TREC_CLASSES = [
    "Abbreviation", "Expression abbreviated", "Animal", "Organ of body", "Color", "Invention, book and other creative piece",
    "Currency name", "Disease and medicine", "Event", "Food", "Musical instrument", "Language", "Letter like a-z",
    "Other entity", "Plant", "Product", "Religion", "Sport", "Element and substance", "Symbols and sign",
    "Techniques and method", "Equivalent term", "Vehicle", "Word with a special property", "Definition of something",
    "Description of something", "Manner of an action", "Reason", "Group or organization of persons",
    "Individual", "Title of a person", "Description of a person", "City", "Country", "Mountain", "Other location",
    "State", "Postcode or other code", "Number of something", "Date", "Distance, linear measure", "Price",
    "Order, rank", "Other number", "Lasting time of somethin", "Percent, fraction", "Speed", "Temperature",
    "Size, area and volume", "Weight",
]


def sentences(rng, count):
    return " ".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))).capitalize() + "." for _ in range(count)
    )


def sample(task, i, context, input_, answers, rng, all_classes=None, length=None, suffix=""):
    return {
        "input": input_,
        "context": context,
        "answers": answers,
        "length": length if length is not None else len(context.split()) + len(input_.split()),
        "dataset": task + suffix,
        "language": "en",
        "all_classes": all_classes,
        "_id": f"{task}{suffix}-fixture-{i:02d}-{rng.randrange(16**8):08x}",
    }


def make(task, i, size, suffix="", length=None):
    rng = random.Random(f"{task}{suffix}/{i}")
    text = sentences(rng, size)
    if task in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"):
        key = rng.choice(WORDS)
        context = f"{text} The keeper of the {key} lives by the sea. {sentences(rng, 2)}"
        return sample(task, i, context, "Who lives by the sea?", [f"the keeper of the {key}", "keeper"], rng,
                      length=length, suffix=suffix)
    if task == "triviaqa":
        context = f"Passage: {text}\nQuestion: What is green?\nAnswer: grass\n\n"
        return sample(task, i, context, f"Passage: {sentences(rng, 3)}\nQuestion: What is blue?\nAnswer:",
                      ["sky", "the sky"], rng, length=length, suffix=suffix)
    if task in ("gov_report", "multi_news"):
        return sample(task, i, text, "", [sentences(rng, 3)], rng, length=length, suffix=suffix)
    if task == "qmsum":
        return sample(task, i, f"Speaker A: {text}\nSpeaker B: {sentences(rng, 3)}", "What did the group decide?",
                      [sentences(rng, 2)], rng, length=length, suffix=suffix)
    if task == "trec":
        shots = "\n".join(f"Question: {sentences(rng, 1)}\nType: {rng.choice(TREC_CLASSES)}" for _ in range(size // 2))
        return sample(task, i, shots, "How far is it from the river to the castle?", ["Distance, linear measure"],
                      rng, all_classes=TREC_CLASSES, length=length, suffix=suffix)
    if task == "samsum":
        shots = "\n\n".join(f"Dialogue: Ann: {sentences(rng, 1)}\nBob: {sentences(rng, 1)}\nSummary: {sentences(rng, 1)}"
                            for _ in range(max(1, size // 3)))
        return sample(task, i, shots, f"Dialogue: Ann: {sentences(rng, 1)}\nBob: {sentences(rng, 1)}\nSummary: ",
                      [sentences(rng, 1)], rng, length=length, suffix=suffix)
    if task == "passage_count":
        unique = [sentences(rng, 2) for _ in range(3)]
        paragraphs = [rng.choice(unique) for _ in range(max(4, size // 4))]
        context = "\n\n".join(f"Paragraph {k + 1}: {p}" for k, p in enumerate(paragraphs))
        return sample(task, i, context, "", [str(len(set(paragraphs)))], rng, length=length, suffix=suffix)
    if task == "passage_retrieval_en":
        paragraphs = [sentences(rng, 2) for _ in range(max(4, size // 4))]
        target = rng.randrange(len(paragraphs))
        context = "\n\n".join(f"Paragraph {k + 1}: {p}" for k, p in enumerate(paragraphs))
        return sample(task, i, context, paragraphs[target], [f"Paragraph {target + 1}"], rng, length=length,
                      suffix=suffix)
    if task in ("lcc", "repobench-p"):
        lines = [f"    total_{k} = compute('{rng.choice(WORDS)}', {k})" for k in range(size)]
        code = "def build():\n" + "\n".join(lines) + "\n"
        input_ = "# in-file code\nresult = build()\n" if task == "repobench-p" else ""
        return sample(task, i, code, input_, [f"    total_{size} = compute('{rng.choice(WORDS)}', {size})"], rng,
                      length=length, suffix=suffix)
    raise ValueError(task)


TASKS = [
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]


def write(name, rows):
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        write(task, [make(task, 0, 6), make(task, 1, 48)])
    for task in ("trec", "hotpotqa"):
        write(f"{task}_e", [make(task, k, 6, suffix="_e", length=n) for k, n in enumerate((1200, 5200, 9100, 3100))])


if __name__ == "__main__":
    main()
