"""The serving API: request parameters and their limits, the backend interface, admission, the gRPC server
and the OpenAI-compatible HTTP API. Imports the router and the layers below it."""
