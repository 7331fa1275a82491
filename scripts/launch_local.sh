#!/usr/bin/env bash
# One kvbench run sharded over the GPUs of this machine (no Slurm): one process per GPU, each with
# its own CUDA_VISIBLE_DEVICES and run.shard; the last shard to finish merges the run.
#
#   scripts/launch_local.sh method=snapkv budget.tokens=128 task=longbench task.dataset=qasper
#   GPUS=0,1,2,3 scripts/launch_local.sh ...     # these GPUs (default: every one nvidia-smi lists)
#   SHARDS=4 scripts/launch_local.sh ...         # N processes without GPUs (CPU; the tests and laptops)
#
# Logs go to logs/launch_local/<time>/shard<i>.log; the exit code is that of the first failed shard.
# Overrides are those of `kvbench run`, not a -m sweep (for a sweep: hydra/launcher=local).
set -euo pipefail

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -n "${GPUS:-}" ]; then
    IFS=, read -r -a devices <<< "$GPUS"
elif [ -z "${SHARDS:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    mapfile -t devices < <(nvidia-smi --query-gpu=index --format=csv,noheader)
else
    devices=()
fi
n=${SHARDS:-${#devices[@]}}
if [ "$n" -lt 1 ]; then
    echo "launch_local.sh: no GPU found; set GPUS=0,1 or SHARDS=N" >&2
    exit 2
fi
logs=${LOGS:-logs/launch_local/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$logs"

pids=()
for ((i = 0; i < n; i++)); do
    if [ ${#devices[@]} -gt 0 ]; then
        gpu=${devices[$((i % ${#devices[@]}))]}
    else
        gpu=""
    fi
    CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" -m kvbench.runner.run "$@" run.num_shards="$n" run.shard="$i" \
        > "$logs/shard$i.log" 2>&1 &
    pids+=($!)
    echo "shard $i of $n: pid $! ${gpu:+GPU $gpu }-> $logs/shard$i.log"
done

trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
for ((i = 0; i < n; i++)); do
    if ! wait "${pids[$i]}"; then
        code=$?
        echo "shard $i failed (exit $code): tail of $logs/shard$i.log" >&2
        tail -n 5 "$logs/shard$i.log" >&2
        [ $status -ne 0 ] || status=$code
    fi
done
exit $status
