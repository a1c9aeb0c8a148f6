"""Named configs carry the reference app's values; unknown names, fields and bad values are errors."""
import os
import tomllib
from fnmatch import fnmatch

import pytest

from gptj_popxl.configs import ConfigError, config_names, field_names, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The reference app's values (design/reference-app-facts.md), field by field.
POD16 = dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400, sequence_length=1024,
             global_batch_size=128, steps=500, learning_rate=5e-6, warmup_proportion=0.005995, lr_schedule="constant",
             weight_decay=0.0, packing=True, micro_batch_size=1, data_parallel=1, tensor_parallel=16, loss_scaling=4096,
             attention_serialisation=2, dtype="float16")
EXPECTED = {
    "gptj_6B_1024_pod16": POD16,
    "gptj_6B_1024_pod64": dict(POD16, data_parallel=4),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=16, vocab_size=128, sequence_length=8,
                 global_batch_size=16, steps=100000, learning_rate=1e-5, warmup_proportion=0.00625,
                 lr_schedule="constant", weight_decay=0.01, packing=True, micro_batch_size=1, data_parallel=2, tensor_parallel=4,
                 loss_scaling=1, attention_serialisation=2, dtype="float32"),
}


def test_names():
    assert config_names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_values(name):
    config = load_config(name)
    assert config.fields() == EXPECTED[name]
    assert sorted(config.fields()) == sorted(field_names())
    expected = EXPECTED[name]
    assert config.gradient_accumulation * config.execution.micro_batch_size * config.execution.data_parallel == \
        expected["global_batch_size"]
    assert config.warmup_steps == int(expected["steps"] * expected["warmup_proportion"])
    model = config.gptj_config(n_positions=2048)
    assert (model.n_layer, model.n_embd, model.n_head, model.rotary_dim, model.vocab_size) == \
        tuple(expected[k] for k in ("n_layer", "n_embd", "n_head", "rotary_dim", "vocab_size"))


def test_derived_values():
    assert [load_config(n).gradient_accumulation for n in sorted(EXPECTED)] == [128, 32, 8]
    assert [load_config(n).warmup_steps for n in sorted(EXPECTED)] == [2, 2, 625]


def test_overrides():
    config = load_config("tiny", {"learning_rate": 3e-4, "data_parallel": 4, "dtype": "float16",
                                  "loss_scaling": "dynamic"})
    assert config.training.learning_rate == 3e-4 and config.execution.dtype == "float16"
    assert config.execution.loss_scaling == "dynamic"
    assert config.gradient_accumulation == 4  # the global batch stays 16
    assert load_config("tiny").training.learning_rate == 1e-5


def test_unknown_name_and_field_list_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown config 'pod9'; valid names: gptj_6B_1024_pod16, "
                                          "gptj_6B_1024_pod64, tiny"):
        load_config("pod9")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['lr'\]; valid fields: n_layer, .*dtype"):
        load_config("tiny", {"lr": 1.0})


@pytest.mark.parametrize("overrides, match", [
    ({"dtype": "float64"}, "tiny.execution.dtype must be one of float32, float16, got 'float64'"),
    ({"lr_schedule": "cosine"}, "tiny.training.lr_schedule must be one of linear, constant"),
    ({"loss_scaling": "auto"}, "tiny.execution.loss_scaling must be a positive number or 'dynamic'"),
    ({"micro_batch_size": 0}, "tiny.execution.micro_batch_size must be an integer >= 1, got 0"),
    ({"steps": True}, "tiny.training.steps must be an integer >= 1, got True"),
    ({"learning_rate": -1.0}, "tiny.training.learning_rate must be a number >= 0"),
    ({"learning_rate": float("inf")}, "tiny.training.learning_rate must be a number >= 0, got inf"),
    ({"loss_scaling": float("nan")}, "tiny.execution.loss_scaling must be a positive number or 'dynamic'"),
    ({"data_parallel": 3}, "tiny: global_batch_size 16 is not a multiple of micro_batch_size 1 x data_parallel 3"),
])
def test_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", overrides)


def test_yml_files_are_package_data():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["gptj_popxl.configs"]
    files = os.listdir(os.path.join(ROOT, "gptj_popxl", "configs"))
    assert all(any(fnmatch(f, p) for p in patterns) for f in files if f.endswith(".yml"))


def test_unknown_section_or_field_in_a_file(tmp_path, monkeypatch):
    import gptj_popxl.configs as configs

    with open(os.path.join(ROOT, "gptj_popxl", "configs", "tiny.yml")) as f:
        tiny = f.read()
    (tmp_path / "typo.yml").write_text(tiny.replace("n_embd:", "hidden_size:"))
    (tmp_path / "extra.yml").write_text(tiny + "optimizer:\n  beta1: 0.9\n")
    (tmp_path / "short.yml").write_text(tiny.replace("  dtype: float32\n", ""))
    monkeypatch.setattr(configs, "_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"typo.yml: unknown field\(s\) \['hidden_size'\] in model; valid fields: "
                                          r"n_layer, n_embd, n_head, rotary_dim, vocab_size"):
        load_config("typo")
    with pytest.raises(ConfigError, match=r"extra.yml: unknown section\(s\) \['optimizer'\]; valid sections: model, "
                                          r"training, execution"):
        load_config("extra")
    with pytest.raises(ConfigError, match=r"short.yml: execution is missing field\(s\) \['dtype'\]"):
        load_config("short")
