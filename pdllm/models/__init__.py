"""Lean dLLM model definitions (LLaDA and Dream families) and checkpoint loading."""
