"""Uncertainty (issue 23): bootstrap intervals equal to the task's score at the full sample and of the
textbook width, paired tests and the sign test against hand counts, tables with intervals, `kvbench
compare`, and claim verdicts from paired tests on the records."""

import math
import random

import numpy as np
import pandas as pd

from kvbench.report.compare import main as compare_main
from kvbench.report.tables import build_tables
from kvbench.tasks.stats import Units, accuracy_units, interval, paired, perplexity_units, sign_test
from tests.helpers import fake_run


def records(scores, task="passkey"):
    return [{"id": f"s{i}", "task": task, "score": float(s)} for i, s in enumerate(scores)]


def test_interval_is_seeded_contains_the_score_and_has_the_textbook_width():
    rng = random.Random(0)
    scores = [rng.random() < 0.5 for _ in range(400)]
    units = accuracy_units(records(scores))["passkey"]
    mean = 100 * sum(scores) / len(scores)
    assert math.isclose(float(units.score(units.sums, units.counts)), mean)
    ci = interval(units)
    assert ci == interval(units)  # the same draws on every call and machine
    assert ci["low"] < mean < ci["high"] and ci["n_units"] == 400
    p = mean / 100
    textbook = 100 * 1.96 * math.sqrt(p * (1 - p) / 400)  # normal approximation of a proportion's 95% interval
    assert abs((ci["high"] - ci["low"]) / 2 - textbook) < 0.15 * textbook
    assert math.isclose(ci["stderr"], 100 * float(np.std(np.array(scores, float), ddof=1)) / 20, rel_tol=1e-3)


def test_perplexity_units_are_token_blocks_and_give_the_tasks_ppl():
    rng = random.Random(1)
    docs = [{"id": f"d{i}", "nll": [round(rng.uniform(0, 5), 4) for _ in range(n)]} for i, n in enumerate((150, 70))]
    units = perplexity_units("ppl_x", docs, block=64)["ppl_x"]
    assert units.keys == ["d0#0", "d0#64", "d0#128", "d1#0", "d1#64"]
    assert units.counts.tolist() == [64, 64, 22, 64, 6]
    tokens = sum(len(d["nll"]) for d in docs)
    assert math.isclose(float(units.score(units.sums, units.counts)), math.exp(sum(sum(d["nll"]) for d in docs) / tokens))


def test_sign_test_matches_hand_counts():
    assert sign_test(9, 1) == 2 * (1 + 10) / 2**10
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(0, 6) == 2 / 2**6


def test_paired_comparison():
    a = accuracy_units(records([0, 1] * 20))["passkey"]
    same = paired(a, a)
    assert same["delta"] == 0 and not same["significant"] and same["ties"] == 40
    b = accuracy_units(records([1, 1] * 20))["passkey"]  # B fixes every sample A missed
    result = paired(a, b)
    assert result["delta"] == 50.0 and result["significant"] and result["low"] > 0
    assert (result["wins"], result["losses"], result["ties"]) == (20, 0, 20) and math.isclose(result["sign_p"], 2 / 2**20, rel_tol=1e-3)
    few = paired(accuracy_units(records([0, 0, 0, 0, 0, 1]))["passkey"], accuracy_units(records([1] * 6))["passkey"])
    assert few["low"] > 0 and few["sign_p"] == 0.0625 and not few["significant"]  # 5 wins of 6: not enough
    shuffled = Units(a.keys[::-1], a.sums[::-1].copy(), a.counts, a.kind)  # pairing is by key, not position
    assert paired(shuffled, a)["ties"] == 40
    ppl_a = Units(["x", "y", "z"], np.array([3.0, 3.0, 3.0]), np.ones(3), "perplexity")
    ppl_b = Units(["x", "y", "z"], np.array([2.0, 2.0, 2.0]), np.ones(3), "perplexity")
    assert paired(ppl_a, ppl_b)["wins"] == 3  # lower perplexity wins


def test_tables_show_intervals_and_compare_pairs_runs(tmp_path, capsys):
    good, poor = [1] * 18 + [0] * 2, [1] * 6 + [0] * 14
    fake_run(tmp_path, "tiny", "passkey", "snapkv", "tokens64", {"passkey": 90.0}, 64, n=20, records=records(good))
    fake_run(tmp_path, "tiny", "passkey", "streamingllm", "tokens64", {"passkey": 30.0}, 64, n=20,
             records=records(poor))
    fake_run(tmp_path, "tiny", "passkey", "h2o", "tokens64", {"passkey": 50.0}, 64, n=200,
             records=records([0.25, 0.75] * 100))  # not 0/1 scores: a bootstrap, centred
    build_tables(tmp_path, "all")
    md = (tmp_path / "tables" / "all_retrieval.md").read_text()
    z = 1.959963984540054  # Wilson by hand: 18 of 20
    centre, half = (0.9 + z * z / 40) / (1 + z * z / 20), z * math.sqrt(0.09 / 20 + z * z / 1600) / (1 + z * z / 20)
    assert f"90.00 [{100 * (centre - half):.2f}, {100 * (centre + half):.2f}]" in md and "30.00 [" in md
    assert "50.00 ± 3." in md  # about 1.96 x 25 / sqrt(200) = 3.46
    csv = pd.read_csv(tmp_path / "tables" / "all_retrieval.csv")
    assert {"passkey_low", "passkey_high"} <= set(csv.columns)
    row = csv[csv["method"] == "snapkv"].iloc[0]
    assert row["passkey_low"] < 90.0 <= row["passkey_high"] <= 100.0
    assert "$\\pm$" in (tmp_path / "tables" / "all_retrieval.tex").read_text()

    assert compare_main(["streamingllm", "snapkv", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| tiny/passkey/streamingllm/tokens64 | tiny/passkey/snapkv/tokens64 | passkey | 20 | 30.00 | 90.00 | +60.00 [" in out
    assert "| yes | 12/0/8 |" in out
    assert compare_main(["streamingllm", "tova", "--results", str(tmp_path)]) == 2


def test_claims_are_significant_only_when_the_paired_test_says_so(tmp_path):
    from kvbench.report.runs import collect, find_runs
    from papers.claims import MODEL, claim_table

    def run(method, budget, scores):
        fake_run(tmp_path, MODEL, "passkey_prose", method, budget, {"passkey_prose": 100 * sum(scores) / len(scores)},
                 int(budget[6:]), n=len(scores), records=records(scores, "passkey_prose"),
                 task_cfg={"filler": "prose"}, method_name=method.split("-")[0])

    for budget in ("tokens64", "tokens128"):
        run("headkv-r2", budget, [1] * 30)  # wins every sample
        run("headkv-r", budget, [1] * 15 + [0] * 15)
        run("snapkv", budget, [1] * 14 + [0] * 16)  # headkv-r wins by one sample: holds, not significant
        run("ada_snapkv", budget, [0] * 30)
    verdicts = claim_table("headkv_longbench", collect(find_runs(tmp_path)))["holds on SmolLM2"].tolist()
    assert verdicts == ["holds, significant", "holds, not significant"]
