"""The cluster's errors, each a kind of the serving taxonomy in `pdllm.errors` (so they reach clients with its
codes without a translation step)."""

from __future__ import annotations

from pdllm.errors import Busy, DeadlineExceeded, PdllmError, Unavailable

# The causes an actor's death is labelled with (cluster/router/faults.py tells them from Ray's errors; an actor
# that ends itself at its memory limit records OUT_OF_MEMORY, cluster/common/memory_limit.py).
OUT_OF_MEMORY = "out of memory"
PROCESS_LOST = "process lost (killed or crashed)"
KILLED = "killed by ray.kill"
NODE_LOST = "node lost"


class ClusterBusy(Busy):
    """Every actor of a kind has a full queue (or refuses work over its memory budget): back off and retry."""


class ClusterTimeout(Unavailable):
    """An actor did not answer within the configured time."""


class RequestExpired(ClusterTimeout, DeadlineExceeded):
    """The request's own deadline passed (a deadline, not an actor fault: DEADLINE_EXCEEDED)."""


class ClusterUnavailable(Unavailable):
    """No live actor of a kind is left to run the request."""


class ActorLost(PdllmError):
    """A decode actor died during the job (internal to the router: the job runs again elsewhere)."""
