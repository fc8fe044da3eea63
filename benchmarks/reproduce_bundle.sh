#!/usr/bin/env bash
# Reproduce the bundled model (pdllm/assets/pdllm-tiny-llada) on one GPU, seed 1234, as a chain of training runs:
#   1. the official run from scratch, 5 minutes (copying, the answer formats, the chunk ranking);
#   2. runs each from the previous one's export, one per [MIX:]MINUTES argument (default: the bundle's chain, reading
#      7.5 and 5, recall_facts 4.8 and 5, recall_facts_long 4.3, then recall_wordings 5.5 and 5.5; a bare number is a
#      `reading` run): the recall stage (rows that ask about several keys of one context, with the pointer, key and
#      match losses; recall_facts also asks facts rows about several subjects, recall_facts_long on rows to the
#      training length, recall_wordings in a grammar's wordings, ranking across rows) for 80% of each
#      run's time, then the tasks and long stages. Each run starts a fresh AdamW at lr 1e-3 with its own cosine, so
#      one run of a chain is one device call of at most 10 minutes.
# The last run's export (float32, the bundle's layout) is OUT_DIR/model; QUICK_EVAL_SECONDS > 0 (default 120) adds a
# quick sparse eval at 2K (QUICK_EVAL_TASKS and QUICK_EVAL_LENGTHS change its cells). The full table follows with
# benchmarks/eval_table.sh OUT_DIR/model OUT_DIR.
#   [FROM=MODEL] [PACK_TO=$OUT] [TRAIN_FLAGS=...] bash benchmarks/reproduce_bundle.sh OUT_DIR [[MIX:]MINUTES ...]
# TRAIN_FLAGS go to every training run, e.g. "--attention flex --compile" (train.py: how a step runs, not what it
# computes).
# FROM skips the official run and starts the chain's first run from that checkpoint (the bundle of commit b55cd10 is
# the official run's output; a later run of the chain takes the run before it). With PACK_TO set (a device's $OUT,
# which takes few files), the model is copied there and the logs packed into results.tgz after each step.
set -uo pipefail
out=${1:?usage: reproduce_bundle.sh OUT_DIR [[MIX:]MINUTES ...]}
shift
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(7.5 5 recall_facts:4.8 recall_facts:5 recall_facts_long:4.3 recall_wordings:5.5 recall_wordings:5.5)
# shellcheck source=benchmarks/bare_checkout.sh
source "$(dirname "$0")/bare_checkout.sh"
pack() {
    [ -n "${PACK_TO:-}" ] || return 0
    [ -d "$out/model" ] && mkdir -p "$PACK_TO/model" && cp "$out"/model/* "$PACK_TO/model/"
    tar -czf "$PACK_TO/results.tgz" -C "$out" --exclude=model --exclude='ckpt*' --exclude=official --exclude="run*" .
}
# shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
train() { python3 -m pdllm.training.train --workers "${WORKERS:-12}" --seed 1234 ${TRAIN_FLAGS:-} "$@"; }
start=${FROM:-}
if [ -z "$start" ]; then
    train --out "$out/ckpt" --minutes 5 --total-minutes 5 --mix official 2>&1 | tee "$out/train_official_log.txt" |
        grep -E '"em"|saved|params' | tail -20
    train --export "$out/ckpt" --out "$out/official" --bundle "$out/official" | tee -a "$out/train_official_log.txt"
    start=$out/official
fi
for i in "${!runs[@]}"; do
    minutes=${runs[$i]##*:}
    mix=reading
    [[ ${runs[$i]} == *:* ]] && mix=${runs[$i]%%:*}
    log=$out/train_run$((i + 1))_log.txt
    echo "run $((i + 1)): mix $mix, $minutes minutes, from $start" | tee "$log"
    train --out "$out/ckpt" --init-from "$start" --mix "$mix" --stage 1 --lr 1e-3 --minutes "$minutes" \
        --total-minutes "$minutes" --pointer-weight 0.5 --key-weight 0.5 --match-weight 0.5 2>&1 | tee -a "$log" |
        grep -E '"em"|saved|params' | tail -40
    train --export "$out/ckpt" --out "$out/run$((i + 1))" --bundle "$out/run$((i + 1))" | tee -a "$log"
    rm -rf "$out/ckpt"  # optimizer state: not needed and too many files to bring back
    start=$out/run$((i + 1))
done
rm -rf "$out/model" && cp -r "$start" "$out/model"
pack
quick_tasks=${QUICK_EVAL_TASKS:-passkey,number_string,niah_single,niah_multikey,kv_retrieval}
if [ "${QUICK_EVAL_SECONDS:-120}" -gt 0 ]; then
    timeout "${QUICK_EVAL_SECONDS:-120}" python3 -m pdllm.cli eval --model "$out/model" \
        --method '{"chunk_size": 256, "top_k": 4}' --task "$quick_tasks" --lengths "${QUICK_EVAL_LENGTHS:-2048}" \
        --modes sparse --samples 8 --json "$out/quick_eval.json" 2>"$out/quick_eval.err" |
        tee "$out/quick_eval.txt"
    pack
fi
echo "reproduce_bundle done after ${SECONDS}s"
