"""Domain values that both ends of the wire exchange, apart from their messages."""

from __future__ import annotations

import dataclasses

from service.protocol.specs import LeafSpec


@dataclasses.dataclass(frozen=True)
class PushHeader:
  """What a push says about itself before its data (`PushGradientsHeader`).

  Attributes:
    worker_id: the pushing worker's stable id.
    push_id: the idempotency key ('' for none): a retry carries the same one.
    step: the step of the parameters the gradients were computed from.
    num_examples: the examples averaged into the gradients (the push's weight).
    model_id: the model the parameters came from ('' skips the check).
    leaves: the gradients' leaves, in the parameters' order, in their wire dtypes.
    local_steps: the worker's local steps these values cover (1: a gradient; H > 1: a
      pseudo-gradient of H local steps, DiLoCo).
  """
  worker_id: str
  push_id: str
  step: int
  num_examples: int
  model_id: str
  leaves: tuple[LeafSpec, ...]
  local_steps: int = 1

  @property
  def nbytes(self) -> int:
    """The push's data bytes on the wire (in its wire dtypes, encoded leaves at their encoded
    size): what admission counts."""
    return sum(s.nbytes for s in self.leaves)

  @property
  def what(self) -> str:
    """How error messages name the push."""
    return f'push of worker {self.worker_id} for step {self.step}'


@dataclasses.dataclass(frozen=True)
class PushResult:
  """The answer to a push (`PushGradientsResponse`).

  Attributes:
    accepted_step: the step the push was counted into.
    applied: whether this push completed its step (the update is applied).
    current_step: the server's step after the push.
    duplicate: a retry of a push already answered (not counted again).
    model_id: the model (history) the push was counted in: wait for the step in it,
      `OptimizerClient.wait_for_step(accepted_step + 1, model_id=model_id)`.
  """
  accepted_step: int
  applied: bool
  current_step: int
  duplicate: bool = False
  model_id: str = ''
