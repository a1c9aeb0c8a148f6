"""Program builders: each takes a model config, one ``ExecutionConfig`` and the host weights, and
returns a compiled program whose session is loaded from those weights.

``inference``: ``build_logits``, ``build_loss_and_grads``. ``training``: ``build_training_step``
(resident or phased).
"""
from gptj_popxl.programs.execution import DTYPES, ExecutionConfig

__all__ = ["DTYPES", "ExecutionConfig"]
