#!/usr/bin/env bash
# A training sweep on one GPU in one call: several runs side by side (each with its own loader workers), each
# exported in bfloat16 and probed with a short sparse eval of the lookup tasks, so a device call that can bring
# back few files still says which run to keep. Each run is NAME:SHAPE:EXTRA-ARGS (EXTRA-ARGS with commas for
# spaces), e.g.
#   PACK_TO=$OUT bash benchmarks/train_sweep.sh /tmp/sweep 7 "scratch:bundle:--pointer-weight,0.5" \
#       "wide:wide:--pointer-weight,0.5"
# Writes OUT_DIR/NAME/{train_log.txt,model/,eval.txt}; with PACK_TO, the logs and evals in logs.tgz and the models
# in models.tar split into 15 MiB parts (models.tar.00, ...).
set -uo pipefail
out=${1:?usage: train_sweep.sh OUT_DIR MINUTES NAME:SHAPE:ARGS ...}
minutes=${2:?minutes}
shift 2
# shellcheck source=benchmarks/bare_checkout.sh
source "$(dirname "$0")/bare_checkout.sh"
workers=$(($(nproc) / $# - 1))
names=()
for spec in "$@"; do
    IFS=: read -r name shape args <<<"$spec"
    names+=("$name")
    mkdir -p "$out/$name"
    (
        python3 -m pdllm.training.train --out "$out/$name/ckpt" --shape "$shape" --minutes "$minutes" \
            --total-minutes "$minutes" --workers "$workers" --seed 1234 ${args//,/ } >"$out/$name/train_log.txt" 2>&1
        python3 -m pdllm.training.train --export "$out/$name/ckpt" --out "$out/$name/model" --bundle "$out/$name/model" \
            --export-dtype bfloat16 >>"$out/$name/train_log.txt" 2>&1
        timeout "${EVAL_SECONDS:-100}" python3 -m pdllm.cli eval --model "$out/$name/model" \
            --method '{"chunk_size": 256, "top_k": 4}' --task "${EVAL_TASKS:-niah_multikey,kv_retrieval,niah_single}" \
            --lengths "${EVAL_LENGTHS:-2048}" --modes sparse --samples 8 --cell-seconds 15 \
            --json "$out/$name/eval.json" >"$out/$name/eval.txt" 2>"$out/$name/eval.err"
    ) &
done
wait
for name in "${names[@]}"; do
    echo "== $name"; grep -E '"em"' "$out/$name/train_log.txt" | tail -n 3; grep -E "exported|saved" "$out/$name/train_log.txt"
    cat "$out/$name/eval.txt"
done
if [ -n "${PACK_TO:-}" ]; then
    tar -czf "$PACK_TO/logs.tgz" -C "$out" --exclude=model --exclude=ckpt .
    tar -cf - -C "$out" $(for n in "${names[@]}"; do echo "$n/model"; done) | split -b 15M -d - "$PACK_TO/models.tar."
fi
echo "train_sweep done after ${SECONDS}s"
