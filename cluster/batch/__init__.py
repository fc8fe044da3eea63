"""Batch jobs: the JSONL job spec, the Redis-backed store of batches and the worker that runs their jobs through a
generation backend. Imports the API layer (parameters, backend interface) and below."""
