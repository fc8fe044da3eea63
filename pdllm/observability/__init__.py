"""Observability: Prometheus metrics (`metrics`), structured JSON logs with request ids (`logs`)."""
