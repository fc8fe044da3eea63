#!/usr/bin/env bash
# Reproduce the bundled model (pdllm/assets/pdllm-tiny-llada) on one GPU, seed 1234, in two training runs:
#   1. the official run from scratch, 5 minutes (copying, the answer formats, the chunk ranking);
#   2. the `reading` run from it, READING_MINUTES (default 8): the recall stage (rows that ask about several keys of
#      one context, with the pointer, key and match losses) for 80% of the time, then the tasks and long stages.
# Then the export (float32, the bundle's layout) to OUT_DIR/model and a quick sparse eval at 2K. The full table
# follows with benchmarks/eval_table.sh OUT_DIR/model OUT_DIR/eval.
#   [FROM=PHASE1_MODEL] [PACK_TO=$OUT] bash benchmarks/reproduce_bundle.sh OUT_DIR [READING_MINUTES]
# FROM skips run 1 and starts run 2 from that checkpoint (a device call holds at most 10 minutes of command, so
# the two runs there are two calls; the bundle of commit b55cd10 is run 1's output). With PACK_TO set (a device's
# $OUT, which takes few files), the model is copied there and the logs packed into results.tgz after each step.
set -uo pipefail
out=${1:?usage: reproduce_bundle.sh OUT_DIR [READING_MINUTES]}
minutes=${2:-8}
# shellcheck source=benchmarks/bare_checkout.sh
source "$(dirname "$0")/bare_checkout.sh"
pack() {
    [ -n "${PACK_TO:-}" ] || return 0
    [ -d "$out/model" ] && mkdir -p "$PACK_TO/model" && cp "$out"/model/* "$PACK_TO/model/"
    tar -czf "$PACK_TO/results.tgz" -C "$out" --exclude=model --exclude=ckpt --exclude=ckpt1 --exclude=official .
}
train() { python3 -m pdllm.training.train --workers "${WORKERS:-12}" --seed 1234 "$@"; }
phase1=${FROM:-}
if [ -z "$phase1" ]; then
    train --out "$out/ckpt1" --minutes 5 --total-minutes 5 --mix official 2>&1 | tee "$out/train_official_log.txt" |
        grep -E '"em"|saved|params' | tail -20
    train --export "$out/ckpt1" --out "$out/official" --bundle "$out/official" | tee -a "$out/train_official_log.txt"
    phase1=$out/official
fi
train --out "$out/ckpt" --init-from "$phase1" --mix reading --stage 1 --lr 1e-3 --minutes "$minutes" \
    --total-minutes "$minutes" --pointer-weight 0.5 --key-weight 0.5 --match-weight 0.5 2>&1 |
    tee "$out/train_log.txt" | grep -E '"em"|saved|params' | tail -40
train --export "$out/ckpt" --out "$out/model" --bundle "$out/model" | tee -a "$out/train_log.txt"
rm -rf "$out/ckpt" "$out/ckpt1"  # optimizer state: not needed and too many files to bring back
pack
timeout "${QUICK_EVAL_SECONDS:-120}" python3 -m pdllm.cli eval --model "$out/model" \
    --method '{"chunk_size": 256, "top_k": 4}' --task passkey,number_string,niah_single,niah_multikey,kv_retrieval \
    --lengths 2048 --modes sparse --samples 8 --json "$out/quick_eval.json" 2>"$out/quick_eval.err" |
    tee "$out/quick_eval.txt"
pack
echo "reproduce_bundle done after ${SECONDS}s"
