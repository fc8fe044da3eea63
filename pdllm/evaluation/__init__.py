"""Long-context evaluation of the generation modes on the synthetic tasks (accuracy, step time, KV read)."""
