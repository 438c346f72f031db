"""The worker's side: the client library of the optimizer service.

    from service.client import OptimizerClient
"""

from service.client.client import ModelInfo, OptimizerClient, Pulled
from service.protocol.types import PushResult

__all__ = ['ModelInfo', 'OptimizerClient', 'Pulled', 'PushResult']
