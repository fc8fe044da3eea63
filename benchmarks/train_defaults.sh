# Sourced by the training scripts (reproduce_bundle.sh, official_seeds.sh): how a run's step runs when TRAIN_FLAGS
# is unset (train.py: how a step runs, not what it computes; TRAIN_FLAGS="" runs eager SDPA). FlexAttention, all
# layers one compiled region, and the loss's tensor-only parts compiled: 6% less GPU time a step than the layers
# alone (--compile stack) and the same wall time where the host sets the pace (32K tokens a batch); the 64K-token
# chain, where the GPU sets it, has run only with these (benchmarks/NOTES.md, "The chain at 64K tokens a batch").
# FlexAttention tuned for the bundle's 32-wide heads: the block mask in tiles of 64 tokens and smaller backward
# blocks, 1.31x faster on the 64K recall step of an H100 (55.4 against 72.4 ms; NOTES, "FlexAttention tuned for
# 32-wide heads"); in the reproduction script's chain 1.07x (72-77 against 78-81 ms a step; NOTES, "The whole script
# with FlexAttention tuned"). The JSON holds no spaces: the scripts split TRAIN_FLAGS into words.
# shellcheck disable=SC2034  # read by the scripts that source this file
DEFAULT_FLEX_OPTIONS='{"MASK_BLOCK_SIZE":64,"BLOCK_M":64,"BLOCK_N":64,"bwd_BLOCK_M1":16,"bwd_BLOCK_N1":64,"bwd_BLOCK_M2":64,"bwd_BLOCK_N2":16}'
# shellcheck disable=SC2034
DEFAULT_TRAIN_FLAGS="--attention flex --compile stack+losses --flex-options $DEFAULT_FLEX_OPTIONS"
