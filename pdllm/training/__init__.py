"""Training the small bundled dLLM: synthetic long-context examples, the masked-diffusion loss, a resumable loop."""
