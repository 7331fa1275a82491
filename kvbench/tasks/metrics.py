"""LongBench metrics with the official semantics (THUDM/LongBench `LongBench/metrics.py`, `eval.py`).

Each metric scores one prediction against one reference, in [0, 1]. The quirks
of the official code are kept on purpose, because published numbers depend on them:

- qa_f1: SQuAD normalisation (lowercase, strip punctuation, drop a/an/the,
  collapse spaces), multiset token F1, 0 when nothing overlaps.
- rouge_l: the `rouge` package's rouge-l F; any exception scores 0 (an empty
  prediction, and that package's recursion error on a ~1000-word text with no period).
- classification: classes that occur in the prediction, minus those that are
  substrings of the answer but not the answer itself — removed while iterating
  over the same list, so the entry after a removed one is not checked (as the
  official loop does); 1/len if the answer is among them.
- retrieval / count: the fraction of the numbers in the prediction that equal
  the answer's paragraph id / the answer.
- code_sim: the first line (after leading newlines) with none of `, #, // (a
  blank line qualifies, none at all gives ""), then fuzzywuzzy's `fuzz.ratio`
  / 100 as python-Levenshtein computes it: rapidfuzz's ratio rounded to an
  integer, and 0 when either string is empty.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    overlap = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_l(prediction: str, reference: str, **_) -> float:
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # noqa: BLE001 - the official scorer turns every failure into 0
        return 0.0


def classification(prediction: str, reference: str, all_classes=(), **_) -> float:
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):  # the official `for term in list: list.remove(term)` skips the next entry
        term = matches[i]
        if term in reference and term != reference:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if reference in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == str(target) for number in numbers) / len(numbers)


def count(prediction: str, reference, **_) -> float:
    return _fraction_equal(prediction, reference)


def retrieval(prediction: str, reference: str, **_) -> float:
    return _fraction_equal(prediction, re.findall(r"Paragraph (\d+)", reference)[0])


def first_code_line(prediction: str) -> str:
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def levenshtein_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio with python-Levenshtein: an integer 0..100, 0 for an empty string."""
    from rapidfuzz import fuzz

    if not a or not b:
        return 0
    return int(round(fuzz.ratio(a, b)))


def code_sim(prediction: str, reference: str, **_) -> float:
    return levenshtein_ratio(first_code_line(prediction), reference) / 100


METRICS = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "retrieval": retrieval,
    "count": count,
    "code_sim": code_sim,
}


def first_line(prediction: str) -> str:
    """The official first-line rule for trec, triviaqa, samsum, lsht."""
    return prediction.lstrip("\n").split("\n")[0]


def best_over_answers(metric: str, prediction: str, answers, all_classes=()) -> float:
    """Per sample: the max of the metric over every reference answer (0 when there are none)."""
    score = 0.0
    for reference in answers:
        score = max(score, METRICS[metric](prediction, reference, all_classes=all_classes))
    return score


def task_score(sample_scores: list[float]) -> float:
    """round(100 * mean, 2), as the official scorer."""
    return round(100 * sum(sample_scores) / len(sample_scores), 2) if sample_scores else float("nan")


def length_bucket(length: int) -> str:
    """LongBench-E's buckets by the sample's `length` field (in words)."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
