#!/usr/bin/env bash
# Train the bundled tiny LLaDA-architecture dLLM with the curriculum, export it, and evaluate vanilla / prefix /
# sparse on every task (the five official families, facts in held-out wordings, facts with non-digit values) at
# 1x-16x the training length and prefix / sparse at 64x (benchmarks/eval_table.sh). Its depth sweep and no-BOS
# ablation run only if training and export ended within EXTRAS_BEFORE seconds. One GPU, one call:
#   [MIX=official|varied|lookup|recall|reading] bash benchmarks/train_and_eval.sh OUT_DIR [TRAIN_MINUTES] [CELL_SECONDS] [EXTRAS_BEFORE]
# MIX picks the training tasks (pdllm/training/data.py curriculum): `official` with 5 minutes is the bundled model's
# first run (benchmarks/reproduce_bundle.sh runs the rest); `varied` adds facts in many wordings and value kinds;
# `lookup` adds a key -> value stage to varied; `recall` a longer one whose rows ask about several keys; `reading`
# keeps that stage to 80% of the time. TRAIN_ARGS passes more flags to train.py (e.g.
# "--pointer-weight 0.5 --key-weight 0.5").
# INIT_FROM=CHECKPOINT_DIR continues from those weights (with STAGE=N to start at curriculum stage N, LR=peak lr);
# EVAL_LENGTHS (default 2048,8192,16384,32768) sets the first evaluation's lengths; LONG_EVAL=0 skips the 128K one.
# Every step writes under OUT_DIR as it finishes, so a run cut short still leaves what it did. With PACK_TO set (a
# device's $OUT, which takes few files), the model is copied there and the rest packed into results.tgz after each step.
set -uo pipefail
out=${1:?usage: train_and_eval.sh OUT_DIR [TRAIN_MINUTES] [CELL_SECONDS] [EXTRAS_BEFORE]}
minutes=${2:-5}
cell=${3:-5}
extras_before=${4:-0}
# shellcheck source=benchmarks/bare_checkout.sh
source "$(dirname "$0")/bare_checkout.sh"
pack() {
    [ -n "${PACK_TO:-}" ] || return 0
    [ -d "$out/model" ] && mkdir -p "$PACK_TO/model" && cp "$out"/model/* "$PACK_TO/model/"
    tar -czf "$PACK_TO/results.tgz" -C "$out" --exclude=model --exclude=ckpt --exclude=export .
}
extra=()
[ -n "${INIT_FROM:-}" ] && extra+=(--init-from "$INIT_FROM")
[ -n "${STAGE:-}" ] && extra+=(--stage "$STAGE")
[ -n "${LR:-}" ] && extra+=(--lr "$LR")
# shellcheck disable=SC2206  # TRAIN_ARGS is a list of flags, split on spaces
[ -n "${TRAIN_ARGS:-}" ] && extra+=($TRAIN_ARGS)
python3 -m pdllm.training.train --out "$out/ckpt" --minutes "$minutes" --total-minutes "$minutes" --workers 12 \
    --seed 1234 --mix "${MIX:-official}" ${extra[@]+"${extra[@]}"} 2>&1 | tee "$out/train_log.txt" |
    grep -E '"em"|saved|params' | tail -40
python3 -m pdllm.training.train --export "$out/ckpt" --out "$out/export" --bundle "$out/model" | tee -a "$out/train_log.txt"
pack
rm -rf "$out/ckpt" "$out/export"  # optimizer state: not needed and too many files to bring back
EXTRAS=$((SECONDS < extras_before ? 1 : 0)) bash benchmarks/eval_table.sh "$out/model" "$out" "$cell"
pack
echo "train_and_eval done after ${SECONDS}s"
