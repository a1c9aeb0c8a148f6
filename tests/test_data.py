"""The data pipeline against the tokenizer applied by hand: padding and masking, run_clm packing,
every supported storage format, and the errors that name the file and row."""
import json

import numpy as np
import pytest

from gptj_popxl.data import (DataError, EOS_TOKEN, LABEL_WORDS, load_local_dataset, load_mnli_rows, load_tokenizer,
                             mnli_prompt, mnli_text, synthetic_mnli, train_bpe_tokenizer)

ROWS = [
    dict(premise="the cat sat", hypothesis="a cat sat", label=0),
    dict(premise="dogs bark loudly", hypothesis="dogs are quiet", label=2),
    dict(premise="owls hunt", hypothesis="owls sleep at noon", label=1),
    dict(premise="bees fly", hypothesis="bees fly", label=0),
    dict(premise="ants dig", hypothesis="ants never dig", label=2),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [mnli_text(r["premise"], r["hypothesis"], r["label"], EOS_TOKEN) for r in ROWS]
    texts += [mnli_text(r["premise"], r["hypothesis"], r["label"], EOS_TOKEN) for r in synthetic_mnli(60)]
    path = str(tmp_path_factory.mktemp("tok"))
    train_bpe_tokenizer(texts, path, vocab_size=100)
    return load_tokenizer(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def hand_ids(tokenizer, row):
    return tokenizer(mnli_text(row["premise"], row["hypothesis"], row["label"], tokenizer.eos_token))["input_ids"]


def test_bpe_tokenizer_is_loadable_with_eos_and_no_pad(tokenizer):
    text = mnli_text("bees fly", "bees fly", 0, EOS_TOKEN)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token_id is None
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 100


def test_padded_rows_mask_all_but_the_target(tokenizer, tmp_path):
    seq = 48
    rows = load_mnli_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer, seq, packing=False)
    assert rows.input_ids.shape == rows.labels.shape == (len(ROWS), seq)
    for i, row in enumerate(ROWS):
        ids = hand_ids(tokenizer, row)
        prompt = len(tokenizer(mnli_prompt(row["premise"], row["hypothesis"]))["input_ids"])
        # No pad token: padded with eos, as GPT-J's tokenizer would be.
        np.testing.assert_array_equal(rows.input_ids[i], ids + [tokenizer.eos_token_id] * (seq - len(ids)))
        expected = np.full(seq, -100)
        expected[prompt:len(ids)] = ids[prompt:]
        np.testing.assert_array_equal(rows.labels[i], expected)
        assert tokenizer.decode(rows.labels[i][rows.labels[i] != -100]) == f" {LABEL_WORDS[row['label']]}{EOS_TOKEN}"


def test_padded_rows_use_the_pad_token_when_there_is_one(tokenizer, tmp_path):
    padded = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    padded.pad_token = padded.convert_ids_to_tokens(5)
    rows = load_mnli_rows(write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), padded, 48, packing=False)
    length = len(hand_ids(tokenizer, ROWS[0]))
    assert (rows.input_ids[0, length:] == 5).all() and (rows.labels[0, length:] == -100).all()


def test_packed_rows_are_run_clm_blocks(tokenizer, tmp_path):
    seq = 8
    rows = load_mnli_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer, seq, packing=True)
    # run_clm's group_texts: concatenate, drop the remainder, cut; labels are a copy.
    stream = [t for row in ROWS for t in hand_ids(tokenizer, row)]
    blocks = len(stream) // seq
    np.testing.assert_array_equal(rows.input_ids, np.array(stream[:blocks * seq]).reshape(blocks, seq))
    np.testing.assert_array_equal(rows.labels, rows.input_ids)


def _save_formats(tmp_path):
    import datasets
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    paths = [write_jsonl(tmp_path / "d.jsonl", ROWS), str(tmp_path / "d.json"), str(tmp_path / "d.csv"),
             str(tmp_path / "d.parquet"), str(tmp_path / "disk"), str(tmp_path / "disk_dict")]
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    frame.to_csv(paths[2], index=False)
    frame.to_parquet(paths[3])
    datasets.Dataset.from_pandas(frame).save_to_disk(paths[4])
    datasets.DatasetDict(train=datasets.Dataset.from_pandas(frame[:2]),
                         validation=datasets.Dataset.from_pandas(frame)).save_to_disk(paths[5])
    return paths


def test_every_local_format_gives_the_same_rows(tokenizer, tmp_path):
    paths = _save_formats(tmp_path)
    expected = np.array([hand_ids(tokenizer, r) + [tokenizer.eos_token_id] * (48 - len(hand_ids(tokenizer, r)))
                         for r in ROWS])
    for path in paths:
        split = "validation" if path.endswith("disk_dict") else "train"
        rows = load_mnli_rows(path, tokenizer, 48, packing=False, split=split)
        np.testing.assert_array_equal(rows.input_ids, expected, err_msg=path)
    assert len(load_local_dataset(paths[5], "train")) == 2
    with pytest.raises(DataError, match=r"disk_dict: no split 'test'; it has \['train', 'validation'\]"):
        load_local_dataset(paths[5], "test")
    # A file is the split 'train' (as datasets.load_dataset names it) and a Dataset folder its own split:
    # asking either for another is refused, not ignored.
    for path in paths[:5]:
        assert len(load_local_dataset(path)) == len(load_local_dataset(path, "train")) == len(ROWS)
        with pytest.raises(DataError, match="no split 'validation'"):
            load_local_dataset(path, "validation")
    import datasets
    import pandas as pd

    named = str(tmp_path / "disk_validation")
    datasets.Dataset.from_pandas(pd.DataFrame(ROWS), split="validation").save_to_disk(named)
    for split in (None, "validation"):
        assert len(load_local_dataset(named, split)) == len(ROWS)
    for split in ("train", "test"):
        with pytest.raises(DataError, match=f"split 'validation'; it has no split '{split}'"):
            load_local_dataset(named, split)


@pytest.mark.parametrize("rows, match", [
    ([{"premise": "a", "label": 0}], r"bad\.jsonl: missing column\(s\) \['hypothesis'\]"),
    ([dict(ROWS[0]), dict(ROWS[1], label=3)], r"bad\.jsonl: row 1: label must be 0, 1 or 2.*got 3"),
    ([dict(ROWS[0], label=-1)], r"bad\.jsonl: row 0: label must be 0, 1 or 2.*got -1"),
    ([dict(ROWS[0]), dict(ROWS[1]), dict(ROWS[2], premise="")], r"bad\.jsonl: row 2: premise must be non-empty"),
    ([dict(ROWS[0]), dict(ROWS[1], hypothesis="word " * 40)],
     r"bad\.jsonl: row 1: the prompt is \d+ tokens.*longer than sequence_length 48"),
])
def test_bad_rows_are_named(tokenizer, tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        load_mnli_rows(write_jsonl(tmp_path / "bad.jsonl", rows), tokenizer, 48, packing=False)


def test_empty_missing_and_uncached_data_sets_are_errors(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("premise,hypothesis,label\n")
    (tmp_path / "d.txt").write_text("hello\n")
    for path, match in [(tmp_path / "empty.jsonl", "empty.jsonl: the data set is empty"),
                        (tmp_path / "header.csv", "header.csv: the data set is empty"),
                        (tmp_path / "d.txt", r"d.txt: unsupported file type '.txt'"),
                        (tmp_path / "missing.jsonl", "missing.jsonl: no such file or directory"),
                        ("nobody/never-cached", "nobody/never-cached: not a local file or folder, and not in the "
                                                "local datasets cache")]:
        with pytest.raises(DataError, match=match):
            load_mnli_rows(str(path), tokenizer, 48, packing=False)
    with pytest.raises(DataError, match=r"tiny.jsonl: its \d+ tokens do not fill one block of sequence_length 4096"):
        load_mnli_rows(write_jsonl(tmp_path / "tiny.jsonl", ROWS[:1]), tokenizer, 4096, packing=True)


def test_mnli_columns_of_plain_rows():
    from gptj_popxl.data import mnli_columns

    assert mnli_columns(ROWS, "rows") == ([r["premise"] for r in ROWS], [r["hypothesis"] for r in ROWS],
                                          [r["label"] for r in ROWS])
    with pytest.raises(DataError, match=r"rows: row 0: label must be 0, 1 or 2.*got True"):
        mnli_columns([dict(ROWS[0], label=True)], "rows")


def test_a_hub_data_set_in_the_local_cache_is_read_without_network(tokenizer, tmp_path, monkeypatch):
    """Lay out a cache entry as ``load_dataset("someone/tiny_mnli", "mnli")`` would leave it, then read it."""
    import glob
    import os
    import shutil

    import datasets

    cache = tmp_path / "cache"
    datasets.load_dataset("json", data_files=write_jsonl(tmp_path / "d.jsonl", ROWS), cache_dir=str(cache))
    built = glob.glob(str(cache / "json" / "*" / "*" / "*"))[0]
    entry = cache / "someone___tiny_mnli" / "mnli" / os.path.relpath(built, os.path.dirname(os.path.dirname(built)))
    shutil.copytree(built, entry)
    os.rename(entry / "json-train.arrow", entry / "tiny_mnli-train.arrow")
    info = json.loads((entry / "dataset_info.json").read_text())
    (entry / "dataset_info.json").write_text(json.dumps(dict(info, config_name="mnli")))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))

    rows = load_mnli_rows("someone/tiny_mnli:mnli", tokenizer, 48, packing=False)
    assert rows.input_ids[:, :8].tolist() == [hand_ids(tokenizer, r)[:8] for r in ROWS]
    with pytest.raises(DataError, match=r"someone/tiny_mnli:mnli \(from the local datasets cache\): .*validation"):
        load_local_dataset("someone/tiny_mnli:mnli", "validation")
    with pytest.raises(DataError, match="someone/tiny_mnli:qqp: not a local file or folder, and not in the local "
                                        "datasets cache"):
        load_local_dataset("someone/tiny_mnli:qqp")
