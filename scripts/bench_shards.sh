#!/usr/bin/env bash
# Wall time of one run in one process vs the same run in N shards (scripts/launch_local.sh), the
# per-sample overhead of the sample loop (wall - generation seconds), and whether scores match.
#   scripts/bench_shards.sh [N=4] [overrides...]      e.g. scripts/bench_shards.sh 4 method=snapkv budget.tokens=128
# Default run: the demo's passkey task (20 samples, 1,024 tokens) with SnapKV at 128 tokens, tiny model.
set -euo pipefail
n=${1:-4}; shift || true
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(method=snapkv budget.tokens=128 task=passkey task.depth_max=0.5)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=$(mktemp -d)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-offline}

t0=$(date +%s.%N)
"$PY" -m kvbench.runner.run logger=none "${args[@]}" paths.results="$out/one" hydra.run.dir="$out/h1" > "$out/one.log" 2>&1
t1=$(date +%s.%N)
SHARDS=$n LOGS="$out/logs" PYTHON="$PY" scripts/launch_local.sh logger=none "${args[@]}" \
    paths.results="$out/sharded" hydra.run.dir="$out/h2" > /dev/null
t2=$(date +%s.%N)

"$PY" - "$out" "$n" "$t0" "$t1" "$t2" <<'PY'
import json, sys
from pathlib import Path
out, n, t0, t1, t2 = Path(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:])
one = next((out / "one").rglob("meta.json")).parent
sharded = next((out / "sharded").rglob("meta.json")).parent
for name, folder, elapsed in (("1 process", one, t1 - t0), (f"{n} shards", sharded, t2 - t1)):
    meta = json.loads((folder / "meta.json").read_text())
    loop = (meta["wall_seconds"] - meta["timing"]["generation_seconds"]) / meta["samples"]
    print(f"{name:>10}: elapsed {elapsed:7.1f} s (processes started to merged), sample-loop seconds "
          f"{meta['wall_seconds']:7.1f} (summed over shards), overhead per sample {loop * 1000:6.1f} ms")
same = (one / "scores.json").read_bytes() == (sharded / "scores.json").read_bytes()
strip = lambda f: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in (f / "predictions.jsonl").open()]
print(f"scores.json identical: {same}; per-sample records identical (timing aside): {strip(one) == strip(sharded)}")
PY
rm -rf "$out"
