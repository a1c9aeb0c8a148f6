"""Global batches: seeded per-epoch shuffling, data-parallel sharding, and resuming at the recorded position.

Row ``i`` of the test data holds the number ``i`` everywhere, so a batch names the rows it took."""
import json

import numpy as np
import pytest

from gptj_popxl.data import BatchStream, DataError, TokenRows, load_local_dataset, synthetic_mnli, write_synthetic_mnli
from gptj_popxl.data.synthetic import NEGATION


def numbered_rows(n, seq=3):
    ids = np.repeat(np.arange(n, dtype=np.int64)[:, None], seq, axis=1)
    return TokenRows(ids, ids + 1000)


def taken(batch):
    """The row numbers of a batch, checking labels came from the same rows."""
    np.testing.assert_array_equal(batch.labels, batch.input_ids + 1000)
    return batch.input_ids[:, 0].tolist()


def test_each_epoch_is_a_permutation_cut_into_global_batches():
    stream = BatchStream(numbered_rows(26), micro_batch_size=2, gradient_accumulation=3, data_parallel=2, seed=7)
    assert stream.global_batch_size == 12 and stream.batches_per_epoch == 2
    epochs = []
    for epoch in range(3):
        rows = []
        for index in range(2):
            batch = next(stream)
            assert (batch.epoch, batch.index) == (epoch, index)
            assert batch.input_ids.shape == (12, 3) and batch.input_ids.dtype == np.int64
            rows += taken(batch)
        assert len(set(rows)) == 24 and set(rows) <= set(range(26))  # 2 left over each epoch
        epochs.append(rows)
    assert epochs[0] != epochs[1] != epochs[2]
    assert sorted(epochs[0]) != list(range(24))  # shuffled, not in order


def test_order_depends_on_the_seed_only():
    def first(seed):
        stream = BatchStream(numbered_rows(40), 1, 4, 2, seed=seed)
        return [taken(next(stream)) for _ in range(5)]

    assert first(3) == first(3)
    assert first(3) != first(4)


def test_replicas_own_contiguous_disjoint_blocks():
    stream = BatchStream(numbered_rows(50), micro_batch_size=2, gradient_accumulation=3, data_parallel=4, seed=0)
    assert [stream.replica_rows(r) for r in range(4)] == [slice(0, 6), slice(6, 12), slice(12, 18), slice(18, 24)]
    seen = [set() for _ in range(4)]
    for _ in range(stream.batches_per_epoch):
        rows = taken(next(stream))
        for r in range(4):
            seen[r].update(rows[stream.replica_rows(r)])
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 48  # no row on two replicas in an epoch
    with pytest.raises(ValueError, match="replica 4 is outside data_parallel 4"):
        stream.replica_rows(4)


@pytest.mark.parametrize("stop_after", [0, 1, 3, 5, 6])
def test_resume_continues_with_the_next_batch(stop_after):
    def stream():
        return BatchStream(numbered_rows(17), micro_batch_size=1, gradient_accumulation=2, data_parallel=2, seed=11)

    never_stopped = stream()
    expected = [taken(next(never_stopped)) for _ in range(stop_after + 6)]
    first = stream()
    done = [taken(next(first)) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state()))  # it is stored as JSON in the checkpoint
    resumed = stream()
    resumed.restore(state)
    assert done + [taken(next(resumed)) for _ in range(6)] == expected


def test_resume_refuses_other_data_or_layout():
    state = BatchStream(numbered_rows(17), 1, 2, 2, seed=11).state()
    for stream, field in [(BatchStream(numbered_rows(17), 1, 2, 2, seed=12), "seed"),
                          (BatchStream(numbered_rows(17), 1, 4, 1, seed=11), "data_parallel"),
                          (BatchStream(numbered_rows(17), 1, 3, 2, seed=11), "global_batch_size"),
                          (BatchStream(numbered_rows(18), 1, 2, 2, seed=11), "rows"),
                          (BatchStream(numbered_rows(17, seq=4), 1, 2, 2, seed=11), "sequence_length")]:
        with pytest.raises(DataError, match=f"cannot resume the data position: .*{field} "):
            stream.restore(state)
    changed = numbered_rows(17)
    changed.input_ids[3, 1] = 99
    with pytest.raises(DataError, match="fingerprint"):
        BatchStream(changed, 1, 2, 2, seed=11).restore(state)
    with pytest.raises(DataError, match="index 4 is not a batch of an epoch of 4"):
        BatchStream(numbered_rows(17), 1, 2, 2, seed=11).restore(dict(state, index=4))


def test_fewer_rows_than_a_global_batch_is_an_error():
    with pytest.raises(DataError, match="d.jsonl: 5 rows, fewer than one global batch of 6"):
        BatchStream(numbered_rows(5), 1, 3, 2, seed=0, where="d.jsonl")


def _rule(row):
    premise, hypothesis = row["premise"].split(), row["hypothesis"].split()
    if hypothesis == premise:
        return 0
    if hypothesis == [premise[0], NEGATION, *premise[1:]]:
        return 2
    assert all(h != p for h, p in zip(hypothesis, premise)), row
    return 1


def test_synthetic_labels_follow_the_rule_and_validation_premises_are_held_out(tmp_path):
    train, validation = synthetic_mnli(300, "train", seed=5), synthetic_mnli(90, "validation", seed=5)
    for rows in (train, validation):
        assert [_rule(r) for r in rows] == [r["label"] for r in rows]
        assert np.bincount([r["label"] for r in rows]).tolist() == [len(rows) // 3] * 3
    assert not {r["premise"] for r in train} & {r["premise"] for r in validation}
    assert synthetic_mnli(300, "train", seed=5) == train
    assert synthetic_mnli(30, "train", seed=5) != synthetic_mnli(30, "train", seed=6)
    paths = write_synthetic_mnli(str(tmp_path), train_size=300, validation_size=90, seed=5)
    loaded = load_local_dataset(paths["validation"])
    assert [dict(r) for r in loaded] == validation
