"""scripts/bench_batch.py on its random model (the `make gpu-check` step) on the CPU: prompts drawn inside the
random model's vocabulary (a GPU run once drew ids past it), and batch 2 gives batch 1's tokens in float32."""

import importlib.util
import json

import torch

from tests.helpers import ROOT


def test_bench_batch_runs_on_the_random_model(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_batch", ROOT / "scripts" / "bench_batch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--model", "random", "--device", "cpu", "--batches", "1,2", "--methods", "full,snapkv",
                    "--prompts", "3", "--prompt-tokens", "48", "--new", "3", "--budget", "16", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "batch_cpu.jsonl").read_text().splitlines()]
    assert [(r["method"], r["batch"]) for r in rows] == [("full", 1), ("full", 2), ("snapkv", 1), ("snapkv", 2)]
    assert all(r["same_as_batch1"] == 1.0 for r in rows)
