"""Decode-step cost when every layer holds a different number of tokens (CAKE, `layers: pyramid`) against one
budget for all layers (SnapKV, Knorm), on a random Llama-2-7B-shaped model (a narrow one on the CPU), per
SDPA backend set: the default, and with cuDNN's attention off (`torch.backends.cuda.enable_cudnn_sdp(False)`).

    python scripts/bench_layer_lengths.py                      # CUDA: 16k prompt, budget 2k, 16 steps
    python scripts/bench_layer_lengths.py --profile            # + the top kernels of CAKE's decode steps

Prints, per backend set and method, the median decode step (and the first step) as a ratio to transformers'
own sdpa step with its DynamicCache, measured in the same run. `kvbench check` found CAKE's and PyramidKV's
steps 17-22x slower than the plain step on an H200 while they cost what a uniform budget costs on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from kvbench.check import CPU_SHAPE, GPU_SHAPE, build_model, run_plain, sync
from kvbench.engine import Budget, Session
from kvbench.methods import build

METHODS = {
    "snapkv (one budget)": {"name": "snapkv"},
    "knorm (one budget)": {"name": "knorm"},
    "knorm layers=pyramid": {"name": "knorm", "layers": "pyramid"},
    "cake": {"name": "cake"},
}


@torch.inference_mode()
def step_times(model, cfg, ids, budget, steps, device) -> list[float]:
    session = Session(model, build(cfg), Budget(tokens=budget), reserve=steps)
    logits = session.prefill(ids)[:, -1]
    sync(device)
    times = []
    for _ in range(steps):
        token = logits.argmax(-1)[:, None]
        start = time.perf_counter()
        logits = session.step(token)[:, -1]
        sync(device)
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def profile_steps(model, cfg, ids, budget, device, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile

    session = Session(model, build(cfg), Budget(tokens=budget), reserve=steps + 1)
    token = session.prefill(ids)[:, -1].argmax(-1)[:, None]
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            token = session.step(token)[:, -1].argmax(-1)[:, None]
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--length", type=int, default=None, help="prompt tokens (16384 on CUDA, 1024 on the CPU)")
    parser.add_argument("--budget", type=int, default=None, help="tokens per head per layer (length / 8)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="print the top kernels of CAKE's steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    length = args.length or (16384 if on_gpu else 1024)
    budget = args.budget or length // 8
    shape = SimpleNamespace(**(GPU_SHAPE if on_gpu else CPU_SHAPE), device=args.device, dtype="bfloat16",
                            max_length=length + args.steps + 16)
    model = build_model(shape)
    ids = torch.randint(4, model.config.vocab_size, (1, length), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    run_plain(model, ids[:, :64], 2, device)  # warm-up
    backends = {"default": True, "cudnn off": False} if on_gpu else {"default": True}
    print(f"{shape.layers} layers x {shape.hidden} wide, prompt {length}, budget {budget}, {args.steps} steps, "
          f"{device.type}")
    print("| backends | method | median step / plain step | first step / plain step | median step ms |")
    print("|---|---|--:|--:|--:|")
    for label, cudnn in backends.items():
        if on_gpu:
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        plain = run_plain(model, ids, args.steps, device)["step_s"]
        print(f"| {label} | transformers sdpa | 1.00 | | {plain * 1e3:.2f} |", flush=True)
        for name, cfg in METHODS.items():
            times = step_times(model, cfg, ids, budget, args.steps, device)
            median = statistics.median(times)
            print(f"| {label} | {name} | {median / plain:.2f} | {times[0] / plain:.2f} | {median * 1e3:.2f} |",
                  flush=True)
    if args.profile:
        if on_gpu:
            torch.backends.cuda.enable_cudnn_sdp(True)
        print(profile_steps(model, METHODS["cake"], ids, budget, device))


if __name__ == "__main__":
    main()
