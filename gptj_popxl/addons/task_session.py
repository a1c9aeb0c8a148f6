"""TaskSession: a popxl Session that knows its input / output streams and named state, and saves and
loads that state as a checkpoint directory.

Checkpoint layout (as popxl-addons writes it): ``model/<name>.npz`` holding one array under the
variable's name (memory-mapped variables: a raw copy of their file, ``model/<name>.npy``),
``session_info.json`` (``session_state``: at least ``steps``, the number of ``run`` calls) and,
when a dataloader is set, ``dataloader.bin`` written by its ``save(path)``. Directories are written
atomically (built aside, then renamed into place).
"""
import glob
import json
import logging
import os
import shutil
from collections import deque
from typing import Dict, Iterable, Mapping

import numpy as np

from ..backend import popxl
from ..checkpoint import atomic_directory
from .named_tensors import NamedTensorData, NamedTensors
from .streams import InputStreams, OutputStreams
from .utils import timer
from .variable_factory import MEMMAPPED_VARIABLES

logger = logging.getLogger(__name__)

_REPORT_MISSING = ("none", "warn", "error")
_SESSION_FILE = "session_info.json"
_DATALOADER_FILE = "dataloader.bin"


def _report_missing(found: Iterable[str], expected: Iterable[str], method: str) -> None:
    """Warns about / raises on names present on only one side (``method``: 'none', 'warn', 'error')."""
    if method not in _REPORT_MISSING:
        raise ValueError(f"report_missing must be one of {_REPORT_MISSING}, got {method!r}")
    if method == "none":
        return
    found, expected = set(found), set(expected)
    lines = []
    if found - expected:
        lines.append(f"Checkpoint keys not in state: {sorted(found - expected)}")
    if expected - found:
        lines.append(f"State keys not in checkpoint: {sorted(expected - found)}")
    if not lines:
        return
    if method == "error":
        raise ValueError("\n".join(lines))
    logger.warning("\n".join(lines))


def write_variables_pb(session, weights: Mapping) -> None:
    """Writes ``{variable: host array}`` into ``session`` (and onto the device when attached)."""
    session.write_variables_data(dict(weights))


class TaskSession(popxl.Session):
    """``popxl.Session(*args, **kwargs)`` plus ``inputs`` / ``outputs`` (InputStreams /
    OutputStreams, or iterables of streams) and ``state``: the NamedTensors of variables that make
    up a checkpoint. ``max_checkpoints``: older checkpoint directories written by this session are
    deleted beyond that many.
    """

    def __init__(self, inputs, outputs, state: NamedTensors, max_checkpoints: int = 1, *args, **kwargs):
        with timer("PopXL compilation"):
            super().__init__(*args, **kwargs)
        self.inputs = inputs if isinstance(inputs, InputStreams) else InputStreams.from_streams(inputs)
        self.outputs = outputs if isinstance(outputs, OutputStreams) else OutputStreams.from_streams(outputs)
        self.state = state
        self.session_state: Dict = {"steps": 0}
        self._dataloader = None
        self._checkpoints: deque = deque()
        self._max_checkpoints = max_checkpoints

    @property
    def dataloader(self):
        """The dataloader checkpointed with the state (it must have ``save(path)`` and ``resume(filename=path)``)."""
        if self._dataloader is None:
            logger.warning("No dataloader set: checkpoints will not hold the data position")
        return self._dataloader

    @dataloader.setter
    def dataloader(self, dl) -> None:
        if not (hasattr(dl, "save") and hasattr(dl, "resume")):
            raise ValueError("TaskSession.dataloader must have `save` and `resume` methods")
        self._dataloader = dl

    def add_session_state_info(self, info: Dict) -> None:
        """Adds JSON-serialisable entries (config, schedule position, ...) to what checkpoints record."""
        self.session_state.update(info)

    def run(self, inputs=None, downcast_inputs: bool = True):
        """``Session.run``, counting the calls in ``session_state["steps"]``."""
        self.session_state["steps"] += 1
        return super().run(inputs, downcast_inputs)

    def get_named_tensors_data(self) -> NamedTensorData:
        """The current value of every ``state`` variable, by name (memory-mapped ones written back to
        their file and returned as it)."""
        named = self.state.to_dict()
        data = self.get_tensors_data(list(named.values()))
        out = {}
        for name, t in named.items():
            array = data[t]
            memmap = MEMMAPPED_VARIABLES.get(t)
            if memmap is not None:
                if memmap.flags.writeable:
                    memmap[...] = array
                    memmap.flush()
                array = memmap
            out[name] = array
        return NamedTensorData.from_dict(out)

    def load_from_session(self, src: "TaskSession", report_missing: str = "none") -> None:
        """Copies the values of ``src``'s state into the same-named variables of this session's state."""
        src_named, dst_named = src.state.to_dict(), self.state.to_dict()
        _report_missing(src_named, dst_named, report_missing)
        data = src.get_tensors_data([src_named[n] for n in src_named if n in dst_named])
        self.write_variables_data({dst_named[n]: data[src_named[n]] for n in src_named if n in dst_named})

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Writes the state, the session state and the dataloader position to ``checkpoint_dir``."""
        state = self.get_named_tensors_data().to_dict()
        checkpoint_dir = os.path.expanduser(checkpoint_dir)
        with timer(f"Saving checkpoint {checkpoint_dir}"), atomic_directory(checkpoint_dir, _SESSION_FILE) as tmp:
            model_dir = os.path.join(tmp, "model")
            os.makedirs(model_dir)
            for name, array in state.items():
                if isinstance(array, np.memmap):
                    shutil.copyfile(array.filename, os.path.join(model_dir, f"{name}.npy"))
                else:
                    np.savez(os.path.join(model_dir, f"{name}.npz"), **{name: array})
            if self._dataloader is not None:
                self._dataloader.save(os.path.join(tmp, _DATALOADER_FILE))
            with open(os.path.join(tmp, _SESSION_FILE), "w") as f:
                json.dump(self.session_state, f)
        if checkpoint_dir in self._checkpoints:
            self._checkpoints.remove(checkpoint_dir)
        self._checkpoints.append(checkpoint_dir)
        while len(self._checkpoints) > max(self._max_checkpoints, 1):
            old = self._checkpoints.popleft()
            logger.info("Deleting old checkpoint %s", old)
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, checkpoint_dir: str, report_missing: str = "warn", skip_memmap: bool = False) -> None:
        """Restores what :meth:`save_checkpoint` wrote: state variables found in ``model/*.npz``,
        the session state and the dataloader position.

        Memory-mapped variables (``model/*.npy``) are restored too unless ``skip_memmap`` (e.g. after
        :func:`initialise_memmap_dir_from_checkpoint` gave them their files). ``report_missing``:
        'none', 'warn' or 'error' about names found on only one side.
        """
        checkpoint_dir = os.path.expanduser(checkpoint_dir)
        model_dir = os.path.join(checkpoint_dir, "model")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"{checkpoint_dir} is not a TaskSession checkpoint: it has no model/ directory")
        with timer(f"Loading checkpoint {checkpoint_dir}"):
            variables = self.state.to_dict()
            saved = {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(model_dir, "*.npz"))}
            raw = {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(model_dir, "*.npy"))}
            expected = [n for n in variables if not (skip_memmap and variables[n] in MEMMAPPED_VARIABLES)]
            _report_missing([n for n in {**saved, **raw} if n in expected or n not in variables], expected,
                            report_missing)
            data = {}
            for name in expected:
                if name in saved:
                    with np.load(saved[name]) as f:
                        data[variables[name]] = f[name]
                elif name in raw:
                    t = variables[name]
                    data[t] = np.fromfile(raw[name], dtype=t.dtype.as_numpy()).reshape(t.shape_on_host)
            self.write_variables_data(data)
            if self._dataloader is not None:
                self._dataloader.resume(filename=os.path.join(checkpoint_dir, _DATALOADER_FILE))
            with open(os.path.join(checkpoint_dir, _SESSION_FILE)) as f:
                loaded = json.load(f)
            _report_missing(loaded, self.session_state, report_missing)
            self.session_state = loaded

    def wandb_histogram(self, name: str, step: int, data: np.ndarray) -> None:
        """Logs a histogram of the finite values of ``data`` and the count of the others to wandb."""
        import wandb
        flat = np.asarray(data, dtype=np.float32).ravel()
        finite = np.isfinite(flat)
        wandb.log({f"{name}:histogram": wandb.Histogram(flat[finite]), f"{name}:not_finite": int((~finite).sum())},
                  step=step)

    def wandb_variable_histograms(self, step: int = 0) -> None:
        """:meth:`wandb_histogram` of every variable of the main graph."""
        for t, data in self.get_tensors_data(self.ir.main_graph.variables).items():
            self.wandb_histogram(t.name, step, data)


def initialise_memmap_dir_from_checkpoint(checkpoint_dir: str, memmap_dir: str) -> None:
    """Copies the memory-mapped variable files (``model/*.npy``) of a checkpoint into ``memmap_dir``,
    so that variables created with that ``memmap_dir`` start from the checkpoint."""
    os.makedirs(memmap_dir, exist_ok=True)
    for path in glob.glob(os.path.join(os.path.expanduser(checkpoint_dir), "model", "*.npy")):
        shutil.copyfile(path, os.path.join(memmap_dir, os.path.basename(path)))
