"""``gptj-popxl demo --quick``: the whole pipeline at the smallest size, its artefacts checked
against transformers (the accuracy goal of the full demo is printed, not asserted)."""
import json
import math
import os
import re

import numpy as np
import torch
import transformers

from gptj_popxl import cli
from gptj_popxl.demo import QUICK

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_writes_a_checkpoint_transformers_generates_the_same_tokens_from(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out

    accuracies = re.findall(r"^accuracy: (\d\.\d{3}) \((\d+)/(\d+)\)$", printed, re.MULTILINE)
    assert len(accuracies) == 2, printed
    for accuracy, correct, total in accuracies:
        assert int(total) == QUICK.validation_size
        assert float(accuracy) == round(int(correct) / int(total), 3)
    assert "$ gptj-popxl finetune" in printed and "--tensor-parallel 2 --data-parallel 2" in printed

    run = out / "finetune"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, QUICK.steps + 1))
    assert all(math.isfinite(r["loss"]) for r in log)
    assert (run / "loss.png").read_bytes().startswith(PNG_SIGNATURE)

    # The generations the demo printed (our generate_many) against transformers' greedy generate.
    checkpoint = run / "checkpoint"
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    hf = transformers.GPTJForCausalLM.from_pretrained(checkpoint)
    generations = [json.loads(line) for line in printed.splitlines() if line.startswith('{"prompt"')]
    assert len(generations) == QUICK.generations
    eos = tokenizer.eos_token_id
    for generation in generations:
        ids = tokenizer(generation["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            theirs = hf.generate(ids, do_sample=False, max_new_tokens=3, eos_token_id=eos, pad_token_id=eos)
        new = theirs[0, ids.shape[1]:].tolist()
        assert generation["tokens"] == new[: new.index(eos) + 1 if eos in new else None]
    assert os.path.isfile(out / "model" / "tokenizer.json")
    assert np.isfinite(float(accuracies[1][0]))
