"""One module per `pdllm` subcommand."""
