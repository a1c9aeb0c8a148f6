"""Program builders: each takes a model config, one ``ExecutionConfig`` and the host weights, and
returns a compiled program whose session is loaded from those weights.

``inference``: ``build_logits``, ``build_loss_and_grads``. ``training``: ``build_training_step``
(everything resident on the device). ``phased``: ``build_phased_training_step`` (weights and optimizer
state in remote buffers, one phase per stage and layer). Both training steps return a
``training.TrainingProgram`` and give the same numbers.
"""
from gptj_popxl.programs.execution import DTYPES, ExecutionConfig

__all__ = ["DTYPES", "ExecutionConfig"]
