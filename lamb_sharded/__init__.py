"""lamb_sharded: the LAMB optimizer with its state sharded across a JAX mesh.

A drop-in for `optax.lamb`: same arguments, same numerics, plus a `mesh` and
`param_specs` to run the update under `shard_map` with one all-reduce per step.
"""

from lamb_sharded._src.lamb import ScaleByLambState
from lamb_sharded._src.lamb import dequantize_moments
from lamb_sharded._src.lamb import lamb
from lamb_sharded._src.lamb import requantize_moments
from lamb_sharded._src.lamb import scale_by_lamb
from lamb_sharded._src.lamb import state_nbytes
from lamb_sharded._src.lowbit import QuantizedMoment
from lamb_sharded._src.lowbit import codes_layout
from lamb_sharded._src.sharding import named_shardings

__version__ = '0.1.0'

__all__ = (
    'QuantizedMoment',
    'ScaleByLambState',
    'codes_layout',
    'dequantize_moments',
    'lamb',
    'named_shardings',
    'requantize_moments',
    'scale_by_lamb',
    'state_nbytes',
)
