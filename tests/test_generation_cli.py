"""``gptj-popxl validate`` and ``generate`` against transformers' greedy generations, counted by hand."""
import json
import os

import numpy as np
import pytest
import tokenizers
import torch
import transformers

from gptj_popxl import cli
from helpers_gptj import tiny_checkpoint

LABELS = ("entailment", "neutral", "contradiction")
WORDS = ["cats", "dogs", "sleep", "run", "the", "a", "park", "sun", "is", "hot", "cold", "rain"]
EOS = "<|endoftext|>"


def train_tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on MNLI-style text, label words merged into single tokens."""
    rng = np.random.default_rng(0)
    corpus = [f"mnli hypothesis: {' '.join(rng.choice(WORDS, 3))} premise: {' '.join(rng.choice(WORDS, 3))} "
              f"target: {LABELS[i % 3]}" for i in range(300)]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    tok.save_pretrained(directory)
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-J whose head favours the label words, so greedy predictions vary between them."""
    root = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer(root / "tok")
    path = tiny_checkpoint(root, vocab_size=len(tok), n_positions=96)
    label_ids = [tok(" " + w)["input_ids"] for w in LABELS]
    assert all(len(ids) == 1 for ids in label_ids), label_ids
    hf = transformers.GPTJForCausalLM.from_pretrained(path)
    with torch.no_grad():
        hf.lm_head.bias[[ids[0] for ids in label_ids]] += 3.0
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(1)
    rows = [{"premise": " ".join(rng.choice(WORDS, 3)), "hypothesis": " ".join(rng.choice(WORDS, 2)),
             "label": int(i % 3) if i % 4 else LABELS[i % 3]} for i in range(9)]
    path = tmp_path_factory.mktemp("data") / "mnli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def hf_completions(model_dir, texts, max_new_tokens):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.GPTJForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        out.append(new)
    return tok, out


def hand_count(model_dir, rows, prefix, max_new_tokens):
    """Accuracy line and confusion counts from transformers' completions, exact label words only."""
    texts = [f"{prefix}mnli hypothesis: {r['hypothesis']} premise: {r['premise']} target:" for r in rows]
    tok, outs = hf_completions(model_dir, texts, max_new_tokens)
    confusion = np.zeros((3, 4), int)
    for r, new in zip(rows, outs):
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        word = tok.decode(new).strip()
        label = r["label"] if isinstance(r["label"], int) else LABELS.index(r["label"])
        confusion[label, LABELS.index(word) if word in LABELS else 3] += 1
    return confusion


def printed_confusion(stdout: str) -> np.ndarray:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("true"))
    return np.array([[int(n) for n in lines[start + 1 + k].split()[1:]] for k in range(3)])


@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_validate_matches_hand_count(model_dir, data, capsys, max_new_tokens):
    path, rows = data
    expected = hand_count(model_dir, rows, "", max_new_tokens)
    assert cli.main(["validate", "--model", model_dir, "--data", str(path), "--batch-size", "2",
                     "--max-new-tokens", str(max_new_tokens)]) == 0
    out = capsys.readouterr().out
    correct = int(np.trace(expected[:, :3]))
    assert f"accuracy: {correct / len(rows):.3f} ({correct}/{len(rows)})" in out
    np.testing.assert_array_equal(printed_confusion(out), expected)
    assert "throughput:" in out
    if max_new_tokens == 1:
        assert 0 < correct < len(rows)  # a count worth checking


def test_validate_few_shot_and_limit(model_dir, data, capsys):
    path, rows = data
    prefix = "".join(f"mnli hypothesis: {r['hypothesis']} premise: {r['premise']} target: "
                     f"{r['label'] if isinstance(r['label'], str) else LABELS[r['label']]}\n" for r in rows[:2])
    expected = hand_count(model_dir, rows[:5], prefix, 1)
    assert cli.main(["validate", "--model", model_dir, "--data", str(path), "--limit", "5", "--few-shot", "2",
                     "--few-shot-data", str(path), "--max-new-tokens", "1"]) == 0
    np.testing.assert_array_equal(printed_confusion(capsys.readouterr().out), expected)


def test_generate_prompts_file_and_stream(model_dir, tmp_path, capsys):
    texts = ["cats run in the park", "the sun is hot", "dogs sleep"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    tok, outs = hf_completions(model_dir, texts, 6)
    assert cli.main(["generate", "--model", model_dir, "--prompts", str(prompts), "--max-new-tokens", "6",
                     "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == texts
    assert [line["tokens"] for line in lines] == outs
    assert cli.main(["generate", "--model", model_dir, "--prompt", texts[0], "--max-new-tokens", "6",
                     "--tensor-parallel", "2"]) == 0
    new = outs[0][: outs[0].index(tok.eos_token_id)] if tok.eos_token_id in outs[0] else outs[0]
    assert capsys.readouterr().out == texts[0] + tok.decode(new) + "\n"


def test_bad_options_exit_2(model_dir, data, tmp_path):
    path, _ = data
    for argv, message in ((["validate", "--model", model_dir, "--data", str(tmp_path / "none.jsonl")], "no such file"),
                          (["validate", "--model", model_dir, "--data", str(path), "--few-shot", "2"], "few-shot-data"),
                          (["generate", "--model", model_dir, "--prompt", "x", "--top-p", "2"], "top-p")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, message


def test_a_checkpoint_without_a_tokenizer_is_named_before_loading(model_dir, data, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(model_dir, name), bare / name)
    for argv in (["generate", "--model", str(bare), "--prompt", "hello"],
                 ["validate", "--model", str(bare), "--data", str(data[0])]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert f"--model {bare}: no tokenizer files in it" in capsys.readouterr().err


def test_generate_runs_without_an_eos_token_to_max_new_tokens(model_dir, tmp_path, capsys):
    """Free generation needs no eos (validate does: MNLI targets end with one)."""
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(model_dir, name), no_eos / name)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer).save_pretrained(no_eos)
    assert transformers.AutoTokenizer.from_pretrained(no_eos).eos_token_id is None
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cats sleep\n")
    assert cli.main(["generate", "--model", str(no_eos), "--prompts", str(prompts), "--max-new-tokens", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"]) == 4
