"""User-facing errors: one line that names the cause; the CLI turns them into exit code 2."""


class PdllmError(Exception):
    """A problem with the user's input or environment (bad checkpoint, bad flag), not a bug."""


class CheckpointError(PdllmError):
    """The model directory is missing, incomplete, corrupt or of an unknown family."""


class InvalidRequest(PdllmError):
    """A request parameter is out of range (empty question, context too long, bad top-K...)."""


# The serving taxonomy: what a request can end in besides an answer. `pdllm.cluster.api.errors` maps each class to
# one gRPC code (and HTTP status) in one table; anything else a request raises (a ValueError from a kernel's shape
# check, a bug) is INTERNAL there, with the cause in the log.


class Busy(PdllmError):
    """Every slot and queue place is taken: back off and retry (RESOURCE_EXHAUSTED)."""


class Unavailable(PdllmError):
    """Nothing can run the request now (actors lost or not answering): safe to retry, since generation has no side
    effects (UNAVAILABLE)."""


class DeadlineExceeded(PdllmError):
    """The request's deadline passed before its answer was ready; work on it stopped (DEADLINE_EXCEEDED)."""


class Cancelled(PdllmError):
    """The caller cancelled or disconnected; work on the request stopped (CANCELLED)."""


class NotFound(PdllmError):
    """A named object (a batch) does not exist (NOT_FOUND)."""


class Conflict(PdllmError):
    """An object of that name exists with other contents (ALREADY_EXISTS)."""
