"""Prefill actors: chunking, batched chunk encoding, publishing chunk KV."""
