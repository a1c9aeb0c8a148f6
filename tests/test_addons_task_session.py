"""TaskSession (checkpoints, memory-mapped variables, dataloader, session state), host_load/host_store,
seed_variable and the named replica groupings, against numpy."""
import json
import os

import numpy as np
import pytest

from gptj_popxl import addons
from gptj_popxl.addons.named_replica_grouping import (fill_none_group, get_ild_replica_grouping,
                                                      get_ild_size_from_popdist, get_instance_replica_grouping,
                                                      is_cross_ild, is_cross_instance)
from gptj_popxl.addons.task_session import initialise_memmap_dir_from_checkpoint
from gptj_popxl.popxl_cpu import ops
from gptj_popxl import popxl_cpu as popxl


class Dataloader:
    """Records where it is; saves / resumes that position as the checkpoint asks."""

    def __init__(self, position=0):
        self.position = position

    def save(self, path):
        with open(path, "w") as f:
            f.write(str(self.position))

    def resume(self, filename):
        with open(filename) as f:
            self.position = int(f.read())


def accumulate_program(initial, memmap_dir=None):
    """A session whose state ``acc.w`` (and ``acc.b``) grows by the loaded ``x`` each run."""
    ir = popxl.Ir()
    facts = addons.NamedVariableFactories()
    facts.insert("acc", addons.NamedVariableFactories(
        w=addons.VariableFactory(lambda: initial["w"], popxl.float32, "w"),
        b=addons.VariableFactory(lambda: initial["b"], popxl.float32, "b")))
    with ir.main_graph:
        x_data, x_stream, x = addons.host_load(np.zeros(3, np.float32), popxl.float32, "x")
        state = facts.init(memmap_dir=memmap_dir)
        ops.var_updates.accumulate_(state.acc.w, x)
        ops.var_updates.accumulate_(state.acc.b, ops.sum(x))
        out_stream = addons.host_store(state.acc.w + 0.0)
    return addons.TaskSession([x_stream], [out_stream], state, 2, ir), x_stream, out_stream


INITIAL = {"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.array(0.5, np.float32)}


def test_host_load_and_store_streams():
    session, x_stream, out_stream = accumulate_program(INITIAL)
    assert x_stream.shape == (3,) and x_stream.dtype == popxl.float32
    with session:
        out = session.run({x_stream: np.array([1, 1, 1], np.float32)})
    np.testing.assert_array_equal(out[out_stream], INITIAL["w"] + 1)
    assert list(session.inputs) == [x_stream.tensor_id] and list(session.outputs) == [out_stream.tensor_id]


def test_checkpoint_round_trip(tmp_path):
    session, x_stream, _ = accumulate_program(INITIAL)
    session.dataloader = Dataloader(position=7)
    session.add_session_state_info({"lr": 0.5})
    x = np.array([1.0, -2.0, 4.0], np.float32)
    with session:
        session.run({x_stream: x})
        session.run({x_stream: x})
        session.save_checkpoint(str(tmp_path / "ckpt"))
    files = sorted(os.listdir(tmp_path / "ckpt" / "model"))
    assert files == ["acc.b.npz", "acc.w.npz"]
    assert json.loads((tmp_path / "ckpt" / "session_info.json").read_text()) == {"steps": 2, "lr": 0.5}

    fresh, _, _ = accumulate_program({"w": np.zeros(3, np.float32), "b": np.array(0.0, np.float32)})
    fresh.dataloader = Dataloader()
    fresh.add_session_state_info({"lr": 0.0})  # same keys as the checkpoint, else report_missing errors
    fresh.load_checkpoint(str(tmp_path / "ckpt"), report_missing="error")
    data = fresh.get_named_tensors_data()
    np.testing.assert_allclose(data.acc.w, INITIAL["w"] + 2 * x)
    np.testing.assert_allclose(data.acc.b, INITIAL["b"] + 2 * x.sum())
    assert fresh.session_state == {"steps": 2, "lr": 0.5} and fresh.dataloader.position == 7


def test_max_checkpoints_and_report_missing(tmp_path, caplog):
    session, x_stream, _ = accumulate_program(INITIAL)
    for i in range(3):
        session.save_checkpoint(str(tmp_path / f"c{i}"))
    assert sorted(os.listdir(tmp_path)) == ["c1", "c2"]  # max_checkpoints=2
    os.remove(tmp_path / "c2" / "model" / "acc.b.npz")
    with pytest.raises(ValueError, match="acc.b"):
        session.load_checkpoint(str(tmp_path / "c2"), report_missing="error")
    session.load_checkpoint(str(tmp_path / "c2"), report_missing="warn")
    assert "acc.b" in caplog.text
    with pytest.raises(FileNotFoundError, match="model"):
        session.load_checkpoint(str(tmp_path))


def test_load_from_session():
    src, x_stream, _ = accumulate_program(INITIAL)
    with src:
        src.run({x_stream: np.ones(3, np.float32)})
    dst, _, _ = accumulate_program({"w": np.zeros(3, np.float32), "b": np.array(0.0, np.float32)})
    dst.load_from_session(src)
    np.testing.assert_allclose(dst.get_named_tensors_data().acc.w, INITIAL["w"] + 1)


def test_memmapped_variables(tmp_path):
    mm = tmp_path / "mm"
    session, x_stream, _ = accumulate_program(INITIAL, memmap_dir=str(mm))
    # The files hold the initial data as raw arrays.
    np.testing.assert_array_equal(np.fromfile(mm / "acc.w.npy", np.float32), INITIAL["w"])
    with session:
        session.run({x_stream: np.ones(3, np.float32)})
        data = session.get_named_tensors_data()
        session.save_checkpoint(str(tmp_path / "ckpt"))
    assert isinstance(data.acc.w, np.memmap)
    np.testing.assert_array_equal(np.fromfile(mm / "acc.w.npy", np.float32), INITIAL["w"] + 1)
    assert sorted(os.listdir(tmp_path / "ckpt" / "model")) == ["acc.b.npy", "acc.w.npy"]
    # A new memmap dir initialised from the checkpoint: variables start from it, data_iter unused.
    mm2 = tmp_path / "mm2"
    initialise_memmap_dir_from_checkpoint(str(tmp_path / "ckpt"), str(mm2))
    restored, _, _ = accumulate_program({"w": np.zeros(3, np.float32), "b": np.array(0.0, np.float32)},
                                        memmap_dir=str(mm2))
    restored.load_checkpoint(str(tmp_path / "ckpt"), report_missing="error", skip_memmap=True)
    np.testing.assert_allclose(restored.get_named_tensors_data().acc.w, INITIAL["w"] + 1)
    np.testing.assert_allclose(restored.get_named_tensors_data().acc.b, INITIAL["b"] + 3)


def test_dataloader_must_save_and_resume():
    session, _, _ = accumulate_program(INITIAL)
    with pytest.raises(ValueError, match="save"):
        session.dataloader = object()


def test_seed_variable_differs_per_group():
    ir = popxl.Ir(replication=4)
    with ir.main_graph:
        var, seed = addons.seed_variable(3, ir.replica_grouping(stride=2, group_size=2))
        out = addons.host_store(seed)
    with popxl.Session(ir) as session:
        values = session.run()[out]
    assert var.dtype == popxl.uint32 and values.shape == (4, 2)
    # Replicas 0, 2 share a group, as do 1, 3; the two groups get different seeds.
    np.testing.assert_array_equal(values[0], values[2])
    np.testing.assert_array_equal(values[1], values[3])
    assert not np.array_equal(values[0], values[1])


def test_named_replica_groupings(monkeypatch):
    monkeypatch.delenv("POPLAR_TARGET_OPTIONS", raising=False)
    ir = popxl.Ir(replication=8)
    with ir.main_graph:
        everyone = ir.replica_grouping()
        strided = ir.replica_grouping(stride=2, group_size=4)
        assert fill_none_group(None, everyone) is everyone and fill_none_group(strided, everyone) is strided
        assert get_ild_size_from_popdist() == 8 and not is_cross_ild(everyone) and not is_cross_instance(strided)
        assert get_instance_replica_grouping() is not None
        monkeypatch.setenv("POPLAR_TARGET_OPTIONS", json.dumps({"ipuLinkDomainSize": 4}))
        assert is_cross_ild(strided)
        ild = get_ild_replica_grouping(strided)
        assert (ild.stride, ild.group_size) == (2, 2)
        ild_all = get_ild_replica_grouping()
        assert (ild_all.stride, ild_all.group_size) == (1, 4)
        named = addons.NamedReplicaGrouping.build_groups(["a.b", "c"], strided)
        assert named.a.b is strided and named.c is strided
        assert addons.NamedReplicaGrouping.build_groups(["x"], None).x.group_size == 8
