"""How a program runs: parallelism, precision, attention blocks and the micro-batch split."""
import dataclasses

from gptj_popxl.backend import popxl
from gptj_popxl.model.config import is_positive_int

DTYPES = {"float32": popxl.float32, "float16": popxl.float16}


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """Execution options shared by every program builder.

    Attributes:
        tensor_parallel: shards (replicas) heads, MLP columns and vocabulary are split over.
        data_parallel: copies of the model, each fed its own rows of the batch (training only).
        dtype: "float32" or "float16": weights and activations on the device (attention
            scores, softmax and the loss are float32 either way).
        attention_serialisation: query blocks the attention is computed in, one after another.
        micro_batch_size: rows one replica computes at once (training only).
        gradient_accumulation: micro-batches per replica per optimizer step (training only).
        phased: training keeps weights and optimizer state in remote buffers and runs the step
            as phases (see ``programs.training``); False keeps everything resident.
    """

    tensor_parallel: int = 1
    data_parallel: int = 1
    dtype: str = "float32"
    attention_serialisation: int = 1
    micro_batch_size: int = 1
    gradient_accumulation: int = 1
    phased: bool = False

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "data_parallel", "attention_serialisation", "micro_batch_size",
                     "gradient_accumulation"):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.phased, bool):
            raise ValueError(f"phased must be True or False, got {self.phased!r}")

    @property
    def replicas(self) -> int:
        """Replicas of the program: ``tensor_parallel * data_parallel``."""
        return self.tensor_parallel * self.data_parallel

    @property
    def global_batch_rows(self) -> int:
        """Rows of one optimizer step: ``micro_batch_size * gradient_accumulation * data_parallel``."""
        return self.micro_batch_size * self.gradient_accumulation * self.data_parallel

    @property
    def popxl_dtype(self):
        """``dtype`` as a popxl dtype."""
        return DTYPES[self.dtype]
