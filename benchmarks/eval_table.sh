#!/usr/bin/env bash
# The evaluation table of a model on one GPU: vanilla / prefix / sparse on every task (the five official families,
# facts in held-out wordings, facts with non-digit values), SAMPLES (default 8) samples a cell, at 1x-16x the training
# length, then the depth sweep and the no-BOS ablation, then prefix / sparse at 64x (131072 tokens; vanilla
# re-encoding 128K tokens at every step does not fit a session's device time). Top-4 chunks of 256 tokens.
#   [PACK_TO=$OUT] bash benchmarks/eval_table.sh MODEL_DIR OUT_DIR [CELL_SECONDS]
# EVAL_LENGTHS (default 2048,8192,16384,32768) sets the first evaluation's lengths; LONG_EVAL=0 skips the 128K one,
# EXTRAS=0 the depth sweep and the ablation. Each evaluation writes OUT_DIR/eval_*.{txt,json} as it finishes; with
# PACK_TO set they are packed into PACK_TO/eval.tgz after each, so a call cut short still brings back what it did.
set -uo pipefail
model=${1:?usage: eval_table.sh MODEL_DIR OUT_DIR [CELL_SECONDS]}
model=$(cd "$model" && pwd)
out=${2:?usage: eval_table.sh MODEL_DIR OUT_DIR [CELL_SECONDS]}
cell=${3:-30}
# shellcheck source=benchmarks/bare_checkout.sh
source "$(dirname "$0")/bare_checkout.sh"
pack() { [ -z "${PACK_TO:-}" ] || tar -czf "$PACK_TO/eval.tgz" -C "$out" .; }
run_eval() {
    local name=$1
    shift
    python3 -m pdllm.cli eval --model "$model" --method '{"chunk_size": 256, "top_k": 4}' --samples "${SAMPLES:-8}" \
        --json "$out/eval_$name.json" "$@" 2>"$out/eval_$name.err" | tee "$out/eval_$name.txt"
    pack
}
run_eval modes --task all --lengths "${EVAL_LENGTHS:-2048,8192,16384,32768}" --modes vanilla,prefix,sparse \
    --cell-seconds "$cell"
if [ "${EXTRAS:-1}" != 0 ]; then
    run_eval depth --task passkey,heldout_wording --lengths 2048 --modes vanilla,sparse --samples 4 \
        --cell-seconds "$cell" --depth-sweep "$out/depth.png"
    run_eval nobos --task all --lengths 2048,16384 --modes sparse --no-bos --cell-seconds "$cell"
fi
# last: the longest, so a call that runs out of time loses only its cells
[ "${LONG_EVAL:-1}" = 0 ] || run_eval 128k --task all --lengths 131072 --modes prefix,sparse --cell-seconds "$((2 * cell))"
echo "eval_table done after ${SECONDS}s"
