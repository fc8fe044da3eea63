"""Serving long-context diffusion LLMs with predictive prefilling."""

__version__ = "0.1.0"
