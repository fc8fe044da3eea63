#!/usr/bin/env bash
# How often the official run learns to copy (the base benchmarks/reproduce_bundle.sh builds the chain on): one
# official run per seed, all at once on one GPU (a run's step is host-bound, so several share the device), each
# OFFICIAL_STEPS steps with TRAIN_FLAGS (default: benchmarks/train_defaults.sh, as in reproduce_bundle.sh); then
# each run's stage changes and last held-out probe (pdllm.training.runlog). The step times of runs sharing a GPU say
# nothing of one run's speed.
#   [TRAIN_FLAGS=...] [WORKERS=3] [OFFICIAL_STEPS=3425] bash benchmarks/official_seeds.sh OUT_DIR [SEED ...]
# Each run's log is OUT_DIR/train_official_seed{SEED}_log.txt; the exit status is the number of runs that failed.
set -uo pipefail
out=${1:?usage: official_seeds.sh OUT_DIR [SEED ...]}
shift
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1234 1235 1236 1237)
# shellcheck source=benchmarks/bare_checkout.sh
source "$(dirname "$0")/bare_checkout.sh"
# shellcheck source=benchmarks/train_defaults.sh
source benchmarks/train_defaults.sh
# shellcheck disable=SC2206  # TRAIN_FLAGS is a list of flags
flags=(--workers "${WORKERS:-3}" --minutes 60 --steps "${OFFICIAL_STEPS:-3425}" --mix official
    ${TRAIN_FLAGS-$DEFAULT_TRAIN_FLAGS})
pids=()
for seed in "${seeds[@]}"; do
    python3 -m pdllm.training.train "${flags[@]}" --seed "$seed" --out "$out/ckpt$seed" \
        >"$out/train_official_seed${seed}_log.txt" 2>&1 &
    pids+=($!)
done
failed=0
for i in "${!seeds[@]}"; do
    wait "${pids[$i]}" || { echo "seed ${seeds[$i]}: the run failed (exit $?)" >&2; failed=$((failed + 1)); }
    python3 -m pdllm.training.runlog "$out/train_official_seed${seeds[$i]}_log.txt"
done
exit "$failed"
