"""Triton kernels (sparse attention over non-contiguous chunk KV, chunk scoring) and their PyTorch references."""
