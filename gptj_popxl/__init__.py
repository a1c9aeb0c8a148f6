"""gptj-popxl: GPT-J as hand-built popxl graphs, with a CPU runtime for popxl programs.

``gptj_popxl.from_pretrained(path, tensor_parallel=..., dtype=..., offload=...)`` loads a Hugging Face
GPT-J checkpoint as a model with ``logits``, ``loss_and_grads``, ``generate``, ``generate_many`` and
``stream`` (see ``gptj_popxl.model.gptj``; the execution options may be one
``gptj_popxl.ExecutionConfig``, ``execution=...``);
``gptj_popxl.Trainer(path, gptj_popxl.TrainingConfig(...))`` fine-tunes one (see ``gptj_popxl.trainer``).
"""

__all__ = ["from_pretrained", "ExecutionConfig", "TrainingConfig", "Trainer"]


def __getattr__(name):
    # Lazy, so that importing a subpackage (e.g. the CPU runtime alone) does not build the model stack.
    if name == "from_pretrained":
        from gptj_popxl.model.gptj import from_pretrained
        return from_pretrained
    if name == "ExecutionConfig":
        from gptj_popxl.programs.execution import ExecutionConfig
        return ExecutionConfig
    if name in ("TrainingConfig", "Trainer"):
        from gptj_popxl import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'gptj_popxl' has no attribute {name!r}")
