"""The worker's side: the client library of the optimizer service.

    from service.client import OptimizerClient
"""

from service.client.client import COMPRESSIONS, ModelInfo, OptimizerClient, Pulled
from service.client.feedback import ErrorFeedback
from service.protocol.types import PushResult

__all__ = ['COMPRESSIONS', 'ErrorFeedback', 'ModelInfo', 'OptimizerClient', 'Pulled', 'PushResult']
