"""kvbench check on the CPU: the same code on a narrow model, and a report that says it is a CPU run."""

import json

import torch

from kvbench.methods import REGISTRY


def test_gpu_check_runs_every_method_on_the_cpu_and_says_so(tmp_path):
    from kvbench.check import main

    threads = torch.get_num_threads()
    rc = main(["--device", "cpu", "--lengths", "48", "--steps", "2", "--out", str(tmp_path), "--hidden", "32",
               "--intermediate", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2"])
    torch.set_num_threads(threads)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and report["ok"] and report["run"].startswith("CPU run")
    assert "CPU run" in (tmp_path / "gpu_check.md").read_text()
    methods = {row["method"] for row in report["rows"]}
    assert set(REGISTRY) <= methods and "sdpa-full (transformers)" in methods
    assert {f"{family} {name} (fp32)" for family in ("gemma3_text", "gpt_oss") for name in ("full", "h2o")} <= methods
    for row in report["rows"]:
        assert row["finite"] and "error" not in row, row
        if row["method"] in REGISTRY:  # a budget above the prompt gives the full cache's logits, within bf16
            assert row["close_above_budget"] and row["rel_logit_diff_above_budget"] <= 0.1, row


def test_gpu_check_runs_only_the_rows_asked_for_and_names_unknown_ones(tmp_path):
    import pytest

    from kvbench.check import main

    threads = torch.get_num_threads()
    small = ["--device", "cpu", "--lengths", "48", "--steps", "2", "--hidden", "32", "--intermediate", "64",
             "--layers", "2", "--heads", "4", "--kv-heads", "2"]
    try:
        assert main([*small, "--out", str(tmp_path), "--methods", "knorm-cake,h2o-kivi2"]) == 0
        with pytest.raises(SystemExit, match="--methods nope unknown"):
            main([*small, "--out", str(tmp_path / "bad"), "--methods", "nope"])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert {row["method"] for row in rows if row["length"] == 48} == {"sdpa-full (transformers)", "full",
                                                                      "knorm-cake", "h2o-kivi2"}
    assert next(r for r in rows if r["method"] == "h2o-kivi2")["close_above_budget"] is None  # reported only
