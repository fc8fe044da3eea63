"""Decode actors: chunk selection, KV fetch and local cache, the denoising loop."""
