"""The memory report proves what phased execution saves: properties of the static analysis, with the
expected sizes computed from the model's shapes by hand."""
import numpy as np
import pytest

import gptj_popxl
from helpers_gptj import tiny_checkpoint

SEQ, MICRO, STEPS, HIDDEN = 8, 2, 2, 32


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    directory = tmp_path_factory.mktemp("memory")
    out = {}
    for layers in (2, 4):
        path = tiny_checkpoint(directory, seed=0, n_layer=layers, n_embd=HIDDEN, n_head=4, vocab_size=50, n_inner=None)
        for phased in (True, False):
            cfg = gptj_popxl.TrainingConfig(phased=phased, micro_batch_size=MICRO, gradient_accumulation=STEPS)
            out[phased, layers] = gptj_popxl.Trainer(path, cfg).memory_report(seq=SEQ)
    return out


def test_phased_peak_is_flat_in_the_layer_count(reports):
    assert reports[True, 4].peak_device_bytes <= 1.1 * reports[True, 2].peak_device_bytes


def test_resident_peak_grows_with_the_layer_count_and_exceeds_phased(reports):
    # Resident keeps every layer's weights and moments on the device: 3 float32 copies of them.
    # attention, MLP, MLP biases, ln_1
    layer_params = 4 * HIDDEN * HIDDEN + 8 * HIDDEN * HIDDEN + 4 * HIDDEN + HIDDEN + 2 * HIDDEN
    growth = reports[False, 4].peak_device_bytes - reports[False, 2].peak_device_bytes
    assert growth >= 2 * layer_params * 4 * 3
    for layers in (2, 4):
        assert reports[True, layers].peak_device_bytes < reports[False, layers].peak_device_bytes
    assert reports[False, 4].remote_bytes == {}


def test_phased_stores_only_layer_inputs_and_their_gradients(reports):
    # x and dx: (layers + 1) rows of STEPS micro-batches of (MICRO, SEQ, HIDDEN) float32 hidden states.
    for layers in (2, 4):
        report = reports[True, layers]
        assert report.remote_bytes["activations"] == 2 * (layers + 1) * STEPS * MICRO * SEQ * HIDDEN * 4


def test_phased_weights_and_optimizer_state_live_in_remote_buffers(reports):
    report = reports[True, 4]
    assert report.resident_bytes["weights"] < 16  # only the vocabulary shard offset
    assert report.remote_bytes["optimizer"] == 2 * report.remote_bytes["weights"]  # two float32 moments
    decoder = report.phase("decoder_bwd")
    # A decoder phase holds one layer's weights and gradient accumulators, not the model's.
    assert decoder.by_kind["weights"] * 4 < report.remote_bytes["weights"]
    assert set(p.name for p in report.phases) >= {"embedding_fwd", "decoder_fwd", "head", "decoder_bwd",
                                                  "embedding_bwd", "dec_optimizer"}
    assert np.all([p.peak_bytes <= report.peak_device_bytes for p in report.phases])


def test_data_parallel_shards_the_optimizer_state(tmp_path):
    path = tiny_checkpoint(tmp_path, seed=0, n_layer=1, n_embd=HIDDEN, n_head=4, vocab_size=50, n_inner=None)
    remote = {}
    for dp in (1, 2):
        cfg = gptj_popxl.TrainingConfig(phased=True, micro_batch_size=MICRO, data_parallel=dp)
        remote[dp] = gptj_popxl.Trainer(path, cfg).memory_report(seq=SEQ).remote_bytes
    # Every tensor of this model splits evenly over 2 replicas: each keeps half the moments and gradients.
    assert remote[2]["optimizer"] * 2 == remote[1]["optimizer"]
    assert remote[2]["gradients"] * 2 == remote[1]["gradients"]
    assert remote[2]["weights"] == remote[1]["weights"]
