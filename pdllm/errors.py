"""User-facing errors: one line that names the cause; the CLI turns them into exit code 2."""


class PdllmError(Exception):
    """A problem with the user's input or environment (bad checkpoint, bad flag), not a bug."""


class CheckpointError(PdllmError):
    """The model directory is missing, incomplete, corrupt or of an unknown family."""


class InvalidRequest(PdllmError):
    """A request parameter is out of range (empty question, context too long, bad top-K...)."""
