"""``gptj-popxl finetune``: option errors exit 2 naming the option; end to end on a tiny checkpoint with a
locally trained tokenizer (that part needs ``gptj_popxl.trainer`` and is skipped without it)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptj_popxl.cli import main
from gptj_popxl.data import EOS_TOKEN, mnli_text, synthetic_mnli, train_bpe_tokenizer, write_synthetic_mnli
from gptj_popxl.finetune import write_loss_curve
from helpers_gptj import tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 8  # packed rows: MNLI prompts are longer than the tests' sequence length


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random GPT-J (vocab 101, n_positions 16) with a 96-token BPE tokenizer, and synthetic MNLI files."""
    base = tmp_path_factory.mktemp("finetune")
    model = tiny_checkpoint(base)
    texts = [mnli_text(r["premise"], r["hypothesis"], r["label"], EOS_TOKEN) for r in synthetic_mnli(200)]
    train_bpe_tokenizer(texts, model, vocab_size=96)
    data = write_synthetic_mnli(str(base / "data"), train_size=60, validation_size=12)
    return dict(model=model, data=data["train"], base=base)


def run_cli(*args):
    return main(["finetune", *map(str, args)])


def expect_usage_error(capsys, args, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("extra, fragments", [
    (["--steps", "0"], ["--steps", "expected an integer >= 1, got 0"]),
    (["--steps", "2", "--epochs", "1"], ["--epochs", "not allowed with argument --steps"]),
    (["--config", "pod9"], ["--config", "invalid choice: 'pod9'", "gptj_6B_1024_pod16", "tiny"]),
    (["--lr-schedule", "cosine"], ["--lr-schedule", "invalid choice: 'cosine'"]),
    (["--loss-scaling", "auto"], ["--loss-scaling", "expected a number > 0, got 'auto'"]),
    (["--learning-rate", "-1"], ["--learning-rate", "expected a number >= 0"]),
    (["--learning-rate", "inf"], ["--learning-rate", "expected a number >= 0, got inf"]),
    (["--loss-scaling", "nan"], ["--loss-scaling", "expected a number > 0, got nan"]),
    (["--seed", "-1"], ["--seed", "expected an integer >= 0, got -1"]),
    (["--dtype", "bfloat16"], ["--dtype", "invalid choice"]),
    (["--sequence-length", "17"], ["--sequence-length 17 exceeds the model's n_positions (16)"]),
    (["--sequence-length", "8", "--attention-serialisation", "3"], ["--attention-serialisation 3 must divide"]),
    (["--config", "tiny"], ["--config tiny is for another model than --model", "n_embd=64 (checkpoint: 36)"]),
    (["--learning-rate", "1e-4", "--resume", "{base}"],
     ["--model, --learning-rate, --packing: cannot be set with --resume"]),
])
def test_bad_options_exit_2_naming_the_option(setup, capsys, tmp_path, extra, fragments):
    extra = [e.format(base=setup["base"]) for e in extra]
    expect_usage_error(capsys, ["--model", setup["model"], "--data", setup["data"], "--output", tmp_path, "--packing",
                                *extra], *fragments)


def test_bad_paths_and_data_exit_2_naming_the_option(setup, capsys, tmp_path):
    common = ["--output", tmp_path / "out", "--packing", "--sequence-length", SEQ]
    expect_usage_error(capsys, ["--data", setup["data"], *common], "--model is required")
    expect_usage_error(capsys, ["--model", tmp_path / "nope", "--data", setup["data"], *common], "--model")
    expect_usage_error(capsys, ["--model", setup["model"], "--data", tmp_path / "none.jsonl", *common],
                       "--data", "none.jsonl: no such file or directory")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{"premise": "a", "hypothesis": "b", "label": 7}\n')
    expect_usage_error(capsys, ["--model", setup["model"], "--data", bad, *common],
                       "--data", "bad.jsonl: row 1: label must be 0, 1 or 2")
    expect_usage_error(capsys, ["--model", setup["model"], "--data", setup["data"], "--tokenizer", tmp_path, *common],
                       "--tokenizer", "no tokenizer files in it")
    expect_usage_error(capsys, ["--model", tiny_checkpoint(tmp_path), "--data", setup["data"], *common],
                       "--model", "no tokenizer files in it")
    expect_usage_error(capsys, ["--resume", tmp_path / "nope", "--data", setup["data"], "--output", tmp_path],
                       "--resume", "no such directory")
    (tmp_path / "file").write_text("")
    expect_usage_error(capsys, ["--model", setup["model"], "--data", setup["data"], "--output", tmp_path / "file"],
                       "--output", "is not a directory")


def test_tokens_outside_the_model_vocabulary_are_refused(setup, capsys, tmp_path):
    big = tmp_path / "big-tok"
    texts = [mnli_text(r["premise"], r["hypothesis"], r["label"], EOS_TOKEN) for r in synthetic_mnli(200)]
    train_bpe_tokenizer(texts, str(big), vocab_size=160)
    expect_usage_error(capsys, ["--model", setup["model"], "--data", setup["data"], "--output", tmp_path / "o",
                                "--tokenizer", big, "--packing", "--sequence-length", SEQ],
                       "--data", "outside the model's vocabulary of 101")


# ``TrainingConfig``'s parameters, as the fine-tuning issue's public API lists them.
TRAINING_CONFIG_PARAMETERS = {
    "learning_rate", "lr_schedule", "warmup_steps", "total_steps", "weight_decay", "beta1", "beta2", "eps",
    "max_grad_norm", "micro_batch_size", "gradient_accumulation", "data_parallel", "tensor_parallel", "dtype",
    "loss_scaling", "phased", "attention_serialisation", "seed"}


def trainer_fields(*flags, model_config=None, batches_per_epoch=5):
    """The ``TrainingConfig`` keyword arguments ``finetune`` would use for ``flags``."""
    import argparse

    from gptj_popxl.configs import load_config
    from gptj_popxl.finetune import add_finetune_parser, resolve_settings, training_config_fields

    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output", "o", *map(str, flags)])
    model_config = model_config or load_config("tiny").gptj_config(n_positions=16)
    fields = training_config_fields(resolve_settings(parser, args, model_config), batches_per_epoch)
    assert set(fields) <= TRAINING_CONFIG_PARAMETERS
    return fields


def test_settings_default_then_config_then_flags():
    assert trainer_fields() == dict(
        learning_rate=1e-5, lr_schedule="linear", warmup_steps=0, total_steps=5, weight_decay=0.0, max_grad_norm=1.0,
        micro_batch_size=1, gradient_accumulation=1, data_parallel=1, tensor_parallel=1, dtype="float32",
        loss_scaling=1.0, phased=True, attention_serialisation=1, seed=0)
    tiny = dict(learning_rate=1e-5, lr_schedule="constant", warmup_steps=625, total_steps=100000, weight_decay=0.01,
                max_grad_norm=1.0, micro_batch_size=1, gradient_accumulation=8, data_parallel=2, tensor_parallel=4,
                dtype="float32", loss_scaling=1, phased=True, attention_serialisation=2, seed=0)
    assert trainer_fields("--config", "tiny") == tiny
    assert trainer_fields("--config", "tiny", "--data-parallel", 4, "--tensor-parallel", 2, "--no-phased",
                          "--learning-rate", 3e-4, "--loss-scaling", "dynamic", "--seed", 9) == \
        dict(tiny, data_parallel=4, gradient_accumulation=4, tensor_parallel=2, phased=False, learning_rate=3e-4,
             loss_scaling="dynamic", seed=9)
    assert trainer_fields("--config", "tiny", "--epochs", 2, batches_per_epoch=400) == \
        dict(tiny, total_steps=800, warmup_steps=5)
    assert trainer_fields("--config", "tiny", "--steps", 50, "--warmup-steps", 7, "--gradient-accumulation", 3) == \
        dict(tiny, total_steps=50, warmup_steps=7, gradient_accumulation=3)
    assert trainer_fields("--epochs", 3, batches_per_epoch=4)["total_steps"] == 12


def test_the_reference_configs_pack_their_rows_unless_told_not_to():
    import argparse

    from gptj_popxl.configs import load_config
    from gptj_popxl.finetune import add_finetune_parser, resolve_settings

    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers())

    def packing(*flags):
        args = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output", "o", *flags])
        return resolve_settings(parser, args, load_config("tiny").gptj_config(n_positions=16))["packing"]
    assert packing() is False
    assert packing("--config", "tiny") is True
    assert packing("--config", "tiny", "--no-packing") is False


def test_loss_curve_is_a_png(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(dict(step=s, loss=1.0 / s)) + "\n" for s in range(1, 6)))
    path = write_loss_curve(str(log), str(tmp_path / "loss.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ end to end (needs gptj_popxl.trainer)


def read_log(output):
    with open(os.path.join(output, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def finetune_args(setup, output, steps):
    return ["--model", setup["model"], "--data", setup["data"], "--output", output, "--steps", steps,
            "--packing", "--sequence-length", SEQ, "--micro-batch-size", 1, "--gradient-accumulation", 2,
            "--learning-rate", 1e-3, "--warmup-steps", 1, "--save-every", 2, "--seed", 3]


def hf_weights(path):
    import transformers

    model = transformers.GPTJForCausalLM.from_pretrained(path)
    return model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_end_to_end_log_checkpoint_curve_and_exact_resume(setup, tmp_path):
    pytest.importorskip("gptj_popxl.trainer")
    import torch

    from gptj_popxl.data import BatchStream, load_mnli_rows, load_tokenizer

    steps = 6
    straight = tmp_path / "straight"
    assert run_cli(*finetune_args(setup, straight, steps)) == 0
    log = read_log(straight)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert all(np.isfinite([r["loss"], r["grad_norm"], r["learning_rate"], r["tokens_per_s"]]).all() for r in log)
    assert all(r["tokens"] == 2 * SEQ for r in log)
    assert os.path.getsize(straight / "loss.png") > 0

    # The first logged loss is transformers' loss on the first global batch of the untouched model.
    rows = load_mnli_rows(setup["data"], load_tokenizer(setup["model"]), SEQ, packing=True)
    batch = next(BatchStream(rows, 1, 2, 1, seed=3))
    reference, _ = hf_weights(setup["model"])
    with torch.no_grad():
        hf_loss = reference(torch.from_numpy(batch.input_ids), labels=torch.from_numpy(batch.labels)).loss.item()
    assert log[0]["loss"] == pytest.approx(hf_loss, rel=1e-4)
    _, final = hf_weights(str(straight / "checkpoint"))
    assert any(not np.array_equal(final[k], w) for k, w in hf_weights(setup["model"])[1].items())

    # Ctrl-C in the middle saves a checkpoint; --resume then gives the same steps and weights bit for bit.
    stopped = tmp_path / "stopped"
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen([sys.executable, "-m", "gptj_popxl.cli", "finetune",
                                *map(str, finetune_args(setup, stopped, steps))], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (stopped / "log.jsonl").exists() or not read_log(stopped):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output
    done = len(read_log(stopped))
    assert done < steps and os.path.isdir(stopped / "checkpoint")
    assert run_cli("--resume", stopped / "checkpoint", "--data", setup["data"], "--output", stopped) == 0
    resumed = read_log(stopped)
    key = ("step", "epoch", "batch", "loss", "grad_norm", "learning_rate")
    assert [[r[k] for k in key] for r in resumed] == [[r[k] for k in key] for r in log]
    _, resumed_weights = hf_weights(str(stopped / "checkpoint"))
    for name, weight in final.items():
        np.testing.assert_array_equal(resumed_weights[name], weight, err_msg=name)


def test_a_checkpoint_carries_the_tokenizer_the_data_was_encoded_with(setup, tmp_path):
    """``--tokenizer`` other than the model folder's own: the checkpoint (which ``validate`` and ``generate``
    read) must encode text as that tokenizer did, not as the model folder's."""
    pytest.importorskip("gptj_popxl.trainer")
    import transformers

    other = tmp_path / "other-tok"
    texts = [mnli_text(r["premise"], r["hypothesis"], r["label"], EOS_TOKEN) for r in synthetic_mnli(200)]
    train_bpe_tokenizer(texts[:40], str(other), vocab_size=80)
    out = tmp_path / "run"
    assert run_cli(*finetune_args(setup, out, 1), "--tokenizer", other) == 0
    text = texts[0]

    def encode(folder):
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(text).input_ids

    assert encode(other) != encode(setup["model"])  # the two tokenizers differ on this text
    assert encode(out / "checkpoint") == encode(other)


def crash_after(monkeypatch, steps: int, args) -> None:
    """Run ``finetune`` with ``args`` until it dies (a simulated crash) as it starts step ``steps + 1``."""
    from gptj_popxl.trainer import Trainer

    step = Trainer.step

    def step_until_the_crash(self, *step_args, **kwargs):
        if self.step_count == steps:
            raise RuntimeError("simulated crash")
        return step(self, *step_args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "step", step_until_the_crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_cli(*args)


def test_resuming_after_a_crash_logs_each_step_once(setup, tmp_path, monkeypatch):
    """A run that dies after its last checkpoint leaves log records past it (and maybe a line cut short);
    the resumed run replaces them, so the log reads as an uninterrupted run's."""
    pytest.importorskip("gptj_popxl.trainer")

    straight = tmp_path / "straight"
    assert run_cli(*finetune_args(setup, straight, 6)) == 0
    crashed = tmp_path / "crashed"
    crash_after(monkeypatch, 3, finetune_args(setup, crashed, 6))  # past the checkpoint of step 2
    with open(crashed / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the write the crash interrupted
    assert run_cli("--resume", crashed / "checkpoint", "--data", setup["data"], "--output", crashed) == 0
    key = ("step", "epoch", "batch", "loss", "grad_norm", "learning_rate")
    assert [[r[k] for k in key] for r in read_log(crashed)] == [[r[k] for k in key] for r in read_log(straight)]


def test_a_run_recorded_with_the_old_default_split_resumes_on_a_named_dataset_folder(setup, tmp_path, monkeypatch):
    """Checkpoints written before the split was checked record "train" for any data set's one split: one
    on a ``save_to_disk`` folder of a Dataset named "validation" still resumes."""
    pytest.importorskip("gptj_popxl.trainer")
    import datasets

    from gptj_popxl.trainer import TRAINER_STATE_FILE

    folder = str(tmp_path / "validation-set")
    datasets.Dataset.from_json(setup["data"], split="validation").save_to_disk(folder)
    setup = dict(setup, data=folder)
    out = tmp_path / "run"
    crash_after(monkeypatch, 2, finetune_args(setup, out, 4))  # at the checkpoint of step 2
    state_file = out / "checkpoint" / TRAINER_STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["data_state"]["split"] is None
    state["data_state"]["split"] = "train"  # as runs before the check recorded it
    state_file.write_text(json.dumps(state))
    assert run_cli("--resume", out / "checkpoint", "--data", folder, "--output", out) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
