"""Cluster bootstrap, chunk index and store, router, gRPC server and config."""
