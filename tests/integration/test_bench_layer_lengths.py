"""scripts/bench_layer_lengths.py on the CPU: it times every method it lists against transformers' own step."""

import importlib.util

import torch

from tests.helpers import ROOT


def test_bench_layer_lengths_prints_a_row_per_method(capsys):
    spec = importlib.util.spec_from_file_location("bench_layer_lengths", ROOT / "scripts" / "bench_layer_lengths.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--device", "cpu", "--length", "96", "--budget", "24", "--steps", "2"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert all(f"| default | {name} |" in out for name in ["transformers sdpa", *bench.METHODS])
