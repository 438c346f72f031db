"""Where `Job` was: kept so that its importers (service/server/peers.py) need no change.

What the processes agree on is service/core/coordination.py: the seam the
engine calls (`Coordination`, a lone process) and the job's implementation of
it (`Job`, over the coordinator's key-value store).
"""

from service.core.coordination import PART_TIMEOUT_S, Decision, Job, final  # noqa: F401

__all__ = ['PART_TIMEOUT_S', 'Decision', 'Job', 'final']
