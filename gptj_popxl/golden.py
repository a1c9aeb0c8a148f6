"""Golden comparison of our popxl GPT-J against Hugging Face transformers.

``compare_with_hf`` runs both models on the same random tokens and reports the largest
differences of the logits, the loss and every parameter gradient, each against a
tolerance (see ``TOLERANCES``). Errors are measured as

* logits and loss: ``max |ours - hf|`` (absolute);
* gradients: ``max |ours - hf| / max |hf|`` per tensor (relative to the tensor's scale).

In float16 both models run in float16, so the differences hold the rounding of both;
the float16 tolerances are scaled to the magnitude of the reference (``max |hf|``) for
logits too, since float16 keeps about 3 significant digits whatever the magnitude.
"""
import contextlib
import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from gptj_popxl.checkpoint import PathLike, atomic_directory
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.gptj import execution_config, from_pretrained
from gptj_popxl.model.layers import IGNORE_INDEX
from gptj_popxl.programs.execution import ExecutionConfig


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Largest accepted errors: ``logits`` absolute, or relative to ``max |hf logits|`` when
    ``logits_relative``; ``loss`` absolute; ``grads`` relative to each gradient's ``max |hf|``."""

    logits: float
    loss: float
    grads: float
    logits_relative: bool = False


TOLERANCES: Dict[str, Tolerances] = {
    "float32": Tolerances(logits=1e-4, loss=1e-5, grads=1e-3),
    # Both models round to float16 after every op (~5e-4 relative each); on random tiny models the
    # measured errors are about 1.6e-3 (logits, relative), 2.5e-4 (loss) and 2.6e-3 (gradients).
    "float16": Tolerances(logits=5e-3, loss=1e-3, grads=1e-2, logits_relative=True),
}


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    """One compared quantity: its largest absolute and relative errors against a tolerance."""

    name: str
    max_abs: float
    max_rel: float
    measure: str  # "abs" or "rel": which of the two is held to ``tolerance``
    tolerance: float

    @property
    def error(self) -> float:
        return self.max_abs if self.measure == "abs" else self.max_rel

    @property
    def passed(self) -> bool:
        # NaN compares false, so a NaN error fails.
        return bool(self.error <= self.tolerance)


@dataclasses.dataclass
class GoldenReport:
    """Result of ``compare_with_hf``: one row per compared quantity and the verdict."""

    model_dir: str
    tensor_parallel: int
    dtype: str
    batch: int
    seq: int
    rows: List[ErrorRow]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def row(self, name: str) -> ErrorRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r} in the golden report")

    def table(self) -> str:
        """A readable table of the errors, with a final PASS/FAIL line."""
        width = max(len(r.name) for r in self.rows)
        lines = [
            f"golden vs transformers: {self.model_dir}  tp={self.tensor_parallel} dtype={self.dtype} "
            f"batch={self.batch} seq={self.seq}",
            f"{'tensor':<{width}}  {'max abs err':>12}  {'max rel err':>12}  {'tolerance':>14}  ok",
        ]
        for r in self.rows:
            tol = f"{r.measure} {r.tolerance:.0e}"
            lines.append(f"{r.name:<{width}}  {r.max_abs:12.3e}  {r.max_rel:12.3e}  {tol:>14}  "
                         f"{'yes' if r.passed else 'NO'}")
        failed = sum(not r.passed for r in self.rows)
        lines.append("PASS" if not failed else f"FAIL: {failed} of {len(self.rows)} past tolerance")
        return "\n".join(lines)


def error_row(name: str, ours: np.ndarray, ref: np.ndarray, measure: str, tolerance: float) -> ErrorRow:
    """Compare ``ours`` with ``ref``: ``max_rel`` is ``max|ours - ref| / max|ref|``."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: our shape {ours.shape} differs from the reference shape {ref.shape}")
    max_abs = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return ErrorRow(name, max_abs, max_rel, measure, tolerance)


# ----------------------------------------------------------------------------- HF side


@contextlib.contextmanager
def _no_progress_bars():
    """transformers without its loading/saving progress bars (they would clutter the report)."""
    import transformers.utils.logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def random_hf_checkpoint(path: PathLike, config: GPTJConfig, seed: int = 0) -> str:
    """Write a ``GPTJForCausalLM`` checkpoint of ``config`` with every parameter random.

    Weights are normal with std ``1/sqrt(fan_in)`` (so activations stay O(1) at any
    width), LayerNorm weights ``1 + N(0, 0.2)`` and all biases ``N(0, 0.2)``: nothing is
    left at an initial 0 or 1 that could hide a misplaced tensor. Needs no network.

    The directory is replaced whole (see ``atomic_directory``). Returns its path.
    """
    import torch
    import transformers

    hf_config = transformers.GPTJConfig(**config.to_hf_dict(), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPTJForCausalLM(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
                p.normal_(1.0, 0.2)
            elif p.ndim == 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    with _no_progress_bars(), atomic_directory(path, "config.json") as tmp:
        model.save_pretrained(tmp)
    return os.fspath(path)


def hf_logits_loss_grads(
    model_dir: PathLike, input_ids: np.ndarray, labels: np.ndarray, dtype: str = "float32"
) -> Tuple[np.ndarray, float, Dict[str, np.ndarray]]:
    """Run transformers' ``GPTJForCausalLM`` (eager attention) on ``input_ids``.

    Returns float32 logits ``(batch, seq, vocab)``, the loss for ``labels`` (shifted
    inside, ``-100`` ignored) and the gradient of that loss for every parameter.
    """
    import torch
    import transformers

    with _no_progress_bars():
        model = transformers.GPTJForCausalLM.from_pretrained(
            os.fspath(model_dir), dtype=getattr(torch, dtype), attn_implementation="eager")
    model.eval()  # no dropout; gradients still flow
    out = model(torch.from_numpy(np.asarray(input_ids, np.int64)), labels=torch.from_numpy(np.asarray(labels, np.int64)))
    out.loss.backward()
    grads = {n: p.grad.float().numpy() for n, p in model.named_parameters()}
    return out.logits.detach().float().numpy(), out.loss.item(), grads


# ----------------------------------------------------------------------------- comparison


def default_seq(config: GPTJConfig, seq: Optional[int] = None) -> int:
    """``seq``, or when None the comparison's default sequence length ``min(16, n_positions)``."""
    return min(16, config.n_positions) if seq is None else seq


def golden_inputs(vocab_size: int, batch: int, seq: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Random token ids and labels: the ids with about a quarter replaced by ``-100``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    labels = np.where(rng.random((batch, seq)) < 0.25, IGNORE_INDEX, ids)
    return ids, labels


def compare_with_hf(
    model_dir: PathLike,
    tensor_parallel: int = 1,
    dtype: str = "float32",
    batch: int = 2,
    seq: Optional[int] = None,
    seed: int = 0,
    attention_serialisation: int = 1,
    *,
    execution: Optional[ExecutionConfig] = None,
) -> GoldenReport:
    """Compare our model with transformers on random tokens of a local HF checkpoint.

    Args:
        model_dir: a Hugging Face GPT-J checkpoint directory.
        tensor_parallel: our tensor-parallel degree.
        dtype: "float32" or "float16", for both models.
        batch, seq: token batch shape; ``seq`` defaults to ``min(16, n_positions)``.
        seed: seed of the random tokens.
        attention_serialisation: query blocks our attention is computed in.
        execution: our execution config as a whole, instead of ``tensor_parallel``, ``dtype`` and
            ``attention_serialisation``.

    Returns:
        A ``GoldenReport`` with rows ``logits``, ``loss`` and one per HF parameter
        gradient, and ``passed`` when all are within ``TOLERANCES[dtype]``.
    """
    execution = execution_config(execution, tensor_parallel=tensor_parallel, dtype=dtype,
                                 attention_serialisation=attention_serialisation)
    model = from_pretrained(model_dir, execution=execution)
    seq = default_seq(model.config, seq)
    ids, labels = golden_inputs(model.config.vocab_size, batch, seq, seed)
    logits = model.logits(ids)
    loss, grads = model.loss_and_grads(ids, labels)
    hf_logits, hf_loss, hf_grads = hf_logits_loss_grads(model_dir, ids, labels, execution.dtype)

    tol = TOLERANCES[execution.dtype]
    logits_row = error_row("logits", logits, hf_logits, "rel" if tol.logits_relative else "abs", tol.logits)
    rows = [logits_row, error_row("loss", np.float64(loss), np.float64(hf_loss), "abs", tol.loss)]
    if sorted(grads) != sorted(hf_grads):
        raise ValueError(f"our gradients are named {sorted(grads)}, transformers' {sorted(hf_grads)}")
    rows += [error_row(name, g, hf_grads[name], "rel", tol.grads) for name, g in grads.items()]
    return GoldenReport(os.fspath(model_dir), execution.tensor_parallel, execution.dtype, batch, seq, rows)
