"""lamb_sharded: the LAMB optimizer with its state sharded across a JAX mesh.

A drop-in for `optax.lamb`: same arguments, same numerics, plus a `mesh` and
`param_specs` to run the update under `shard_map` with one all-reduce per step.
"""

from lamb_sharded._src.lamb import ScaleByLambState
from lamb_sharded._src.lamb import lamb
from lamb_sharded._src.lamb import scale_by_lamb
from lamb_sharded._src.sharding import named_shardings

__version__ = '0.1.0'

__all__ = (
    'ScaleByLambState',
    'lamb',
    'named_shardings',
    'scale_by_lamb',
)
