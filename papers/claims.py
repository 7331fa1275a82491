"""The papers' claims, checked on SmolLM2-135M on the CPU (`make reproduce-table EXP=<name> SCALE=cpu`).

Each paper experiment has a `configs/experiment/<name>_cpu.yaml` sweep (SmolLM2-135M-Instruct, real
English text, contexts that fit minutes on 2 cores) and here a list of claims: the paper's statement,
the rule that decides it (fixed before any run, never tuned to a result) and the runs it reads. Writes
`results/tables/<name>_cpu.{md,csv}`: one row per claim, "holds on SmolLM2: holds, significant / holds, not
significant / does not hold / not run", with the numbers behind it and the paired tests on the same samples
(kvbench.tasks.stats: 95% paired-bootstrap interval of B - A, pooled over sub-tasks; a sign test over tasks
for "most tasks").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.report.compare import run_units
from kvbench.report.runs import newest
from kvbench.runner.folder import atomic_write_text
from kvbench.tasks.stats import Units, paired, sign_test

MODEL = "smollm2-135m"
CPU_NOTE = ("CPU SCALE: SmolLM2-135M-Instruct (Q4_1 weights, dequantised) on real English text with short "
            "contexts; each row is one of the paper's claims and whether it holds on this model.")


def score(long: pd.DataFrame, task: str, method: str, budget: str) -> float | None:
    """The mean sub-task score of the newest run with these labels (None when it is not on disk)."""
    if long.empty:
        return None
    rows = long[(long["model"] == MODEL) & (long["task"] == task) & (long["method"] == method)
                & (long["budget"] == budget)]
    if rows.empty:
        return None
    return round(float(newest(rows)["score"].mean()), 4)


def run_folder(long: pd.DataFrame, task: str, method: str, budget: str) -> str | None:
    rows = long[(long["model"] == MODEL) & (long["task"] == task) & (long["method"] == method)
                & (long["budget"] == budget)] if not long.empty else long
    return None if rows.empty else newest(rows)["run"].iloc[0]


def better(long: pd.DataFrame, task: str, worse: tuple[str, str], best: tuple[str, str]) -> dict | None:
    """The paired comparison of run `best` (method, budget) against run `worse` on `task`'s sub-task(s),
    pooled over sub-tasks: B - A, its 95% paired-bootstrap interval and `significant` in the claimed
    direction (higher accuracy, lower perplexity); None when a run is missing."""
    a, b = run_folder(long, task, *worse), run_folder(long, task, *best)
    if a is None or b is None or not all((Path(f) / "predictions.jsonl").exists() for f in (a, b)):
        return None
    units_a, units_b = run_units(a), run_units(b)
    common = [s for s in units_a if s in units_b]
    pool = lambda units: Units([f"{s}/{k}" for s in common for k in units[s].keys],  # noqa: E731
                               np.concatenate([units[s].sums for s in common]),
                               np.concatenate([units[s].counts for s in common]), units[common[0]].kind)
    result = paired(pool(units_a), pool(units_b))
    lower_better = units_a[common[0]].kind == "perplexity"
    claimed = result["high"] < 0 if lower_better else result["low"] > 0  # in the claimed direction
    result["significant"] = bool(claimed and result["significant"])
    return result


def _ci(result: dict | None) -> str:
    if result is None:
        return ""
    return f"{result['delta']:+.2f} [{result['low']:+.2f}, {result['high']:+.2f}] (n={result['n_units']})"


def per_subtask(long: pd.DataFrame, task: str, method: str, budget: str) -> dict[str, float]:
    rows = long[(long["model"] == MODEL) & (long["task"] == task) & (long["method"] == method)
                & (long["budget"] == budget)] if not long.empty else long
    if rows.empty:
        return {}
    rows = newest(rows)
    return dict(zip(rows["subtask"], rows["score"].astype(float)))


@dataclass
class Claim:
    """A claim's verdict from point estimates (`holds`) and from paired tests on the same samples
    (`significant`: every comparison the claim makes excludes 0 from its 95% interval in the claimed
    direction); `evidence` lists those comparisons."""

    claim: str
    holds: bool | None  # None: a run it needs is missing
    numbers: str
    significant: bool | None = None
    evidence: str = ""

    def row(self) -> dict:
        if self.holds is None:
            verdict = "not run"
        elif not self.holds:
            verdict = "does not hold"
        else:
            verdict = {True: "holds, significant", False: "holds, not significant"}.get(
                self.significant, "holds (no per-sample records to test)")
        return {"claim": self.claim, "holds on SmolLM2": verdict, "numbers": self.numbers,
                "paired test (B - A, 95% CI)": self.evidence}


def _all_significant(results: list[dict | None]) -> bool | None:
    return None if any(r is None for r in results) else all(r["significant"] for r in results)


def _fmt(values: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {'—' if v is None else f'{v:.2f}'}" for k, v in values.items())


# ----------------------------------------------------------------------------- per experiment

SINK_TASK, SINK_BUDGET = "ppl_prose", "tokens32"
FAR_WORSE = 2.0  # "far worse": at least twice the perplexity (the paper: 5158 vs 9.59)


def streamingllm_sinks(long: pd.DataFrame) -> list[Claim]:
    ppl = {s: score(long, SINK_TASK, f"streamingllm-sink{s}", SINK_BUDGET) for s in (0, 1, 4)}
    shown = _fmt({f"PPL {s} sinks": v for s, v in ppl.items()}) + f" (cache {SINK_BUDGET[6:]} tokens, {SINK_TASK})"
    missing = any(v is None for v in ppl.values())
    four_vs = {s: better(long, SINK_TASK, (f"streamingllm-sink{s}", SINK_BUDGET), ("streamingllm-sink4", SINK_BUDGET))
               for s in (0, 1)}
    return [
        Claim(f"StreamingLLM: PPL with 0 sinks is far worse (>= {FAR_WORSE:g}x) than with 4 sinks at the same cache",
              None if missing else ppl[0] >= FAR_WORSE * ppl[4], shown, _all_significant([four_vs[0]]),
              f"4 sinks - 0 sinks: {_ci(four_vs[0])}"),
        Claim("StreamingLLM: 4 sinks give a lower PPL than 1 sink at the same cache",
              None if missing else ppl[4] < ppl[1], shown, _all_significant([four_vs[1]]),
              f"4 sinks - 1 sink: {_ci(four_vs[1])}"),
    ]


WKV_TASK, WKV_CACHES = "ppl_prose_w256", ("tokens32", "tokens64")


def weightedkv_ppl(long: pd.DataFrame) -> list[Claim]:
    out = []
    for cache in WKV_CACHES:
        ppl = {m: score(long, WKV_TASK, m, cache) for m in ("weightedkv", "h2o-sink4", "streamingllm", "tova")}
        ppl["full"] = score(long, WKV_TASK, "full", "full")
        missing = any(ppl[m] is None for m in ("weightedkv", "h2o-sink4", "streamingllm"))
        holds = None if missing else ppl["weightedkv"] < min(ppl["h2o-sink4"], ppl["streamingllm"])
        tests = {m: better(long, WKV_TASK, (m, cache), ("weightedkv", cache)) for m in ("h2o-sink4", "streamingllm")}
        out.append(Claim(f"WeightedKV: lower PPL than H2O (4 sinks) and StreamingLLM at cache {cache[6:]} "
                         f"(sliding protocol, window 256)", holds,
                         _fmt({f"PPL {m}": v for m, v in ppl.items()}) + f" ({WKV_TASK})",
                         _all_significant(list(tests.values())),
                         "; ".join(f"weightedkv - {m}: {_ci(r)}" for m, r in tests.items())))
    return out


VATP_TASK, VATP_BUDGET = "longbench", "ratio0.5"


def vatp_longbench(long: pd.DataFrame) -> list[Claim]:
    out = []
    for base, ours in (("h2o", "vatp"), ("scissorhands", "vatp-scissorhands")):
        a, b = per_subtask(long, VATP_TASK, base, VATP_BUDGET), per_subtask(long, VATP_TASK, ours, VATP_BUDGET)
        tasks = sorted(set(a) & set(b))
        wins = sum(b[t] > a[t] for t in tasks)
        ties = sum(b[t] == a[t] for t in tasks)
        holds = None if not tasks else wins > len(tasks) / 2
        numbers = (f"{ours} beats {base} on {wins} of {len(tasks)} tasks ({ties} ties); "
                   + "; ".join(f"{t} {a[t]:.1f}->{b[t]:.1f}" for t in tasks))
        # "on most tasks": a sign test over the tasks (ties dropped) at the 5% level
        p = sign_test(wins, len(tasks) - wins - ties)
        out.append(Claim(f"VATP: {ours} beats its attention-only base {base} on most tasks (50% budget)", holds,
                         numbers if tasks else "—", None if not tasks else bool(wins > len(tasks) - wins - ties
                                                                                and p < 0.05),
                         f"sign test over tasks: p = {p:.3g}; all samples pooled: "
                         f"{_ci(better(long, VATP_TASK, (base, VATP_BUDGET), (ours, VATP_BUDGET)))}" if tasks else ""))
    return out


HEADKV_TASK, HEADKV_BUDGETS = "passkey_prose", ("tokens64", "tokens128")


def headkv_longbench(long: pd.DataFrame) -> list[Claim]:
    out = []
    for variant in ("headkv-r2", "headkv-r"):
        acc = {(m, b): score(long, HEADKV_TASK, m, b) for m in (variant, "snapkv", "ada_snapkv") for b in HEADKV_BUDGETS}
        missing = any(v is None for v in acc.values())
        holds = None if missing else all(acc[(variant, b)] > max(acc[("snapkv", b)], acc[("ada_snapkv", b)])
                                         for b in HEADKV_BUDGETS)
        tests = {(m, b): better(long, HEADKV_TASK, (m, b), (variant, b))
                 for m in ("snapkv", "ada_snapkv") for b in HEADKV_BUDGETS}
        out.append(Claim(f"HeadKV: {variant} beats SnapKV and Ada-SnapKV at small budgets on retrieval "
                         f"({HEADKV_TASK}, budgets {', '.join(b[6:] for b in HEADKV_BUDGETS)})", holds,
                         _fmt({f"{m}@{b[6:]}": v for (m, b), v in acc.items()}), _all_significant(list(tests.values())),
                         "; ".join(f"{variant} - {m}@{b[6:]}: {_ci(r)}" for (m, b), r in tests.items())))
    return out


NIAH_TASK, NIAH_BUDGET = "niah", "tokens128"


def niah(long: pd.DataFrame) -> list[Claim]:
    """Claims the 2025-26 papers make with needle heatmaps (issue 24), decided by the mean over the grid."""
    acc = {m: score(long, NIAH_TASK, m, NIAH_BUDGET) for m in ("streamingllm", "snapkv", "snapkv-agnostic")}
    acc["full"] = score(long, NIAH_TASK, "full", "full")
    shown = _fmt({f"{m}": v for m, v in acc.items()}) + f" ({NIAH_TASK}, cache {NIAH_BUDGET[6:]} tokens)"
    kept = better(long, NIAH_TASK, ("streamingllm", NIAH_BUDGET), ("snapkv", NIAH_BUDGET))
    aware = better(long, NIAH_TASK, ("snapkv-agnostic", NIAH_BUDGET), ("snapkv", NIAH_BUDGET))
    return [
        Claim("SnapKV keeps the needle where StreamingLLM loses it (needle heatmap, same cache)",
              None if acc["snapkv"] is None or acc["streamingllm"] is None else acc["snapkv"] > acc["streamingllm"],
              shown, _all_significant([kept]), f"snapkv - streamingllm: {_ci(kept)}"),
        Claim("Query-agnostic compression scores below query-aware at the same budget on needle tasks (SnapKV)",
              None if acc["snapkv"] is None or acc["snapkv-agnostic"] is None
              else acc["snapkv-agnostic"] < acc["snapkv"], shown, _all_significant([aware]),
              f"snapkv (aware) - snapkv-agnostic: {_ci(aware)}"),
    ]


CLAIMS = {
    "niah": niah,
    "streamingllm_sinks": streamingllm_sinks,
    "weightedkv_ppl": weightedkv_ppl,
    "vatp_longbench": vatp_longbench,
    "headkv_longbench": headkv_longbench,
}


def claim_table(name: str, long: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([c.row() for c in CLAIMS[name](long)],
                        columns=["claim", "holds on SmolLM2", "numbers", "paired test (B - A, 95% CI)"])


def write_claims(name: str, long: pd.DataFrame, out_dir: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    """results/tables/<name>_cpu.{md,csv}: one row per claim."""
    frame = claim_table(name, long)
    paths = {ext: Path(out_dir) / f"{name}_cpu.{ext}" for ext in ("md", "csv")}
    atomic_write_text(paths["md"], f"{CPU_NOTE}\n\n{frame.to_markdown(index=False)}\n")
    atomic_write_text(paths["csv"], f"# {CPU_NOTE}\n{frame.to_csv(index=False)}")
    return frame, paths
