# Sourced by the training scripts (reproduce_bundle.sh, official_seeds.sh): how a run's step runs when TRAIN_FLAGS
# is unset (train.py: how a step runs, not what it computes; TRAIN_FLAGS="" runs eager SDPA). FlexAttention, all
# layers one compiled region, and the loss's tensor-only parts compiled: 6% less GPU time a step than the layers
# alone (--compile stack) and the same wall time where the host sets the pace (32K tokens a batch); the 64K-token
# chain, where the GPU sets it, has run only with these (benchmarks/NOTES.md, "The chain at 64K tokens a batch").
# shellcheck disable=SC2034  # read by the scripts that source this file
DEFAULT_TRAIN_FLAGS="--attention flex --compile stack+losses"
