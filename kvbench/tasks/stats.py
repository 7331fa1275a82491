"""How sure a score is: 95% bootstrap intervals of a run's scores and paired tests between two runs.

A sub-task's score is a statistic of resampling units, each with a key (to pair runs), a sum and a count:

- accuracy tasks (passkey, LongBench, ...): one unit per sample, its score in [0, 1]; statistic 100 * mean
  (the task's own score); the standard error is the sample standard deviation over sqrt(n);
- perplexity: the token NLLs of each document in blocks of `PPL_BLOCK` consecutive tokens (neighbouring
  tokens are not independent: a block bootstrap); statistic exp(sum NLL / tokens), the task's PPL.

Intervals are percentile bootstraps: `RESAMPLES` resamples of the units with replacement, drawn by a numpy
generator seeded with `SEED` (the same run gives the same interval on every machine); where every sample
scores 0 or 1 (retrieval, exact match) the Wilson score interval of the proportion instead, which stays
honest at 0/n and n/n and small n (a bootstrap of six zeros is the point 0). A paired comparison
of runs A and B resamples their common units with the same draws, so the interval of B - A keeps the
pairing. A sign test over the units (wins / losses, ties dropped, exact two-sided binomial; McNemar's exact
test for 0/1 scores) is run beside it; the difference is significant when the interval excludes 0 and the
sign test's p < 0.05 (the bootstrap alone is too bold for a handful of samples: 5 wins of 6 give an interval
that excludes 0 but p = 0.0625). A table's average over sub-tasks gets the
half-width sqrt(sum of half-widths^2) / k (the sub-tasks are disjoint samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES, LEVEL, SEED = 1000, 0.95, 0
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
PPL_BLOCK = 64  # tokens per resampling block of a perplexity document


@dataclass
class Units:
    """One sub-task's resampling units: keys, per-unit sums and counts, and how they make a score."""

    keys: list[str]
    sums: np.ndarray
    counts: np.ndarray
    kind: str = "accuracy"  # or "perplexity"

    def score(self, sums, counts):
        ratio = np.asarray(sums).sum(axis=-1) / np.asarray(counts).sum(axis=-1)
        return np.exp(ratio) if self.kind == "perplexity" else 100 * ratio

    def subset(self, keys: list[str]) -> Units:
        where = {k: i for i, k in enumerate(self.keys)}
        index = [where[k] for k in keys]
        return Units(list(keys), self.sums[index], self.counts[index], self.kind)


def accuracy_units(records: list[dict]) -> dict[str, Units]:
    """Units of an accuracy task: one per record, grouped by its `task` (the sub-task)."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["task"], []).append(record)
    return {task: Units([r["id"] for r in rows], np.array([float(r["score"]) for r in rows]), np.ones(len(rows)))
            for task, rows in groups.items()}


def perplexity_units(label: str, records: list[dict], block: int = PPL_BLOCK) -> dict[str, Units]:
    """Units of a perplexity task: blocks of `block` token NLLs per document (record `nll`)."""
    keys, sums, counts = [], [], []
    for record in records:
        nll = record["nll"]
        for start in range(0, len(nll), block):
            keys.append(f"{record['id']}#{start}")
            sums.append(math.fsum(nll[start : start + block]))
            counts.append(len(nll[start : start + block]))
    return {label: Units(keys, np.array(sums), np.array(counts, dtype=float), "perplexity")}


def task_units(task, records: list[dict]) -> dict[str, Units]:
    """The units of every sub-task of `task` (its `units(records)` when it defines them)."""
    return task.units(records) if hasattr(task, "units") else accuracy_units(records)


def bootstrap(n: int, statistic, seed: int = SEED) -> np.ndarray:
    """`statistic(draws)` over RESAMPLES resamples of n units (draws: (k, n) indices), drawn from one seeded
    generator in chunks of at most 2**22 indices, so 50,000 perplexity blocks need ~32 MiB, not 400."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // max(n, 1))
    return np.concatenate([statistic(rng.integers(0, n, size=(min(chunk, RESAMPLES - start), n)))
                           for start in range(0, RESAMPLES, chunk)])


def resampled(units: Units, seed: int = SEED) -> np.ndarray:
    """The sub-task's score over RESAMPLES bootstrap resamples of its units."""
    return bootstrap(len(units.keys), lambda draws: units.score(units.sums[draws], units.counts[draws]), seed)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (in 0..1): right at 0/n and n/n, where a bootstrap of
    identical samples collapses to a point."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(units: Units, seed: int = SEED) -> dict:
    """{low, high, method}: for per-sample scores that are all 0 or 1 (retrieval, exact match, classification)
    the Wilson score interval, else the 95% percentile bootstrap; stderr (accuracy: of the mean; perplexity:
    the bootstrap's standard deviation) and n units."""
    n = len(units.keys)
    if n == 0:
        return {"low": None, "high": None, "stderr": None, "n_units": 0}
    tail = 100 * (1 - LEVEL) / 2
    binary = units.kind == "accuracy" and bool(np.isin(units.sums, (0.0, 1.0)).all())
    values = None if binary else resampled(units, seed)  # Wilson's needs no resampling
    if binary:
        low, high = (100 * x for x in wilson(float(units.sums.sum()), n))
    else:
        low, high = np.percentile(values, [tail, 100 - tail])
    if units.kind == "accuracy":
        stderr = 100 * float(np.std(units.sums, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    else:
        stderr = float(np.std(values, ddof=1))
    return {"low": round(float(low), 4), "high": round(float(high), 4), "stderr": round(stderr, 4), "n_units": n,
            "method": "wilson" if binary else "bootstrap"}


def intervals(task, records: list[dict]) -> dict[str, dict]:
    """Every sub-task's interval (what scores.json stores under `intervals`)."""
    return {subtask: interval(units) for subtask, units in task_units(task, records).items()}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial p-value of `wins` against `losses` (ties left out) under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: Units, b: Units, seed: int = SEED) -> dict:
    """B against A on their common units: scores, delta = B - A with its 95% paired-bootstrap interval,
    per-unit wins / losses / ties of B and the sign test's p, and `significant` (both agree)."""
    common = [k for k in a.keys if k in set(b.keys)]
    if not common:
        return {"n_units": 0, "delta": None, "low": None, "high": None, "significant": None}
    a, b = a.subset(common), b.subset(common)
    deltas = bootstrap(len(common), lambda draws: b.score(b.sums[draws], b.counts[draws])
                       - a.score(a.sums[draws], a.counts[draws]), seed)
    tail = 100 * (1 - LEVEL) / 2
    low, high = (float(x) for x in np.percentile(deltas, [tail, 100 - tail]))
    per_a, per_b = a.sums / a.counts, b.sums / b.counts
    better = per_b < per_a if a.kind == "perplexity" else per_b > per_a  # a unit B does better on
    worse = per_b > per_a if a.kind == "perplexity" else per_b < per_a
    wins, losses = int(better.sum()), int(worse.sum())
    return {
        "n_units": len(common),
        "a": round(float(a.score(a.sums, a.counts)), 4),
        "b": round(float(b.score(b.sums, b.counts)), 4),
        "delta": round(float(b.score(b.sums, b.counts) - a.score(a.sums, a.counts)), 4),
        "low": round(low, 4),
        "high": round(high, 4),
        "significant": bool((low > 0 or high < 0) and sign_test(wins, losses) < 1 - LEVEL),
        "wins": wins,
        "losses": losses,
        "ties": len(common) - wins - losses,
        "sign_p": float(f"{sign_test(wins, losses):.4g}"),
    }
