"""The worker's side: the client library of the optimizer service.

    from service.client import OptimizerClient
"""

from service.client.client import (COMPRESSIONS, ModelInfo, ModelMismatch, OptimizerClient,
                                   Pulled, ServerRestarting, model_difference)
from service.client.feedback import ErrorFeedback
from service.protocol.types import PushResult

__all__ = ['COMPRESSIONS', 'ErrorFeedback', 'ModelInfo', 'ModelMismatch', 'OptimizerClient',
           'Pulled', 'PushResult', 'ServerRestarting', 'model_difference']
