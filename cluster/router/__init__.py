"""The router: placement of prefill and decode work on actors, fault bookkeeping (deaths, restarts, re-admission),
request assembly (tokens, chunks, jobs) and cluster status. Imports the KV layer and below."""
