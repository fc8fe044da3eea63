"""What every cluster layer shares: the limits, the error taxonomy, auth tokens, process statistics, the memory
guard and the event box. Imports nothing of the cluster above it."""
