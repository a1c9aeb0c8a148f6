"""``gptj-popxl validate`` and ``gptj-popxl generate``: MNLI accuracy by generation, and text generation.

``validate`` prompts the model with each example in the MNLI format (``data.mnli``), greedily
generates the label, and counts a prediction only when the completion, up to the end-of-text
token, is exactly one of the label words; anything else is "unknown". ``--few-shot K`` puts K
solved examples of ``--few-shot-data`` before every prompt. ``generate`` streams the completion
of ``--prompt`` to the terminal, or writes one JSON line per prompt of ``--prompts``.

The model directory holds the checkpoint and its tokenizer (``AutoTokenizer.from_pretrained``).
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from gptj_popxl.data.mnli import LABEL_WORDS, mnli_prompt

COMMANDS = ("validate", "generate")
UNKNOWN = "unknown"
# Prompts handed to generate_many at a time (per batch slot), so the progress bar moves.
PROMPTS_PER_SLOT = 4
_DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def add_parsers(commands, positive_int) -> None:
    """Register ``validate`` and ``generate`` on the ``gptj-popxl`` subparsers."""
    validate = commands.add_parser("validate", help="MNLI accuracy by greedy generation")
    validate.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    validate.add_argument("--data", required=True,
                          help="MNLI rows: premise, hypothesis, label (json/jsonl/csv/parquet)")
    validate.add_argument("--batch-size", type=positive_int, default=8, help="generation slots")
    validate.add_argument("--max-new-tokens", type=positive_int, default=5, help="tokens generated per example")
    validate.add_argument("--limit", type=positive_int, default=None, help="use only the first N examples")
    validate.add_argument("--few-shot", type=int, default=0, metavar="K", help="solved examples before each prompt")
    validate.add_argument("--few-shot-data", default=None, help="rows the few-shot examples are taken from")
    validate.add_argument("--tensor-parallel", type=positive_int, default=1, help="tensor-parallel degree")

    generate = commands.add_parser("generate", help="generate text from a prompt or a file of prompts")
    generate.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; its tokens are printed as they come")
    source.add_argument("--prompts", help="file of prompts, one per line (or jsonl with a 'prompt' field); "
                                          "one JSON line per prompt is written to stdout")
    source.add_argument("--prompt-ids", type=_token_ids, metavar="ID,ID,...",
                        help="one prompt as token ids (no tokenizer needed); prints the generated ids, "
                             "tokens/s and peak memory")
    generate.add_argument("--max-new-tokens", type=positive_int, default=20, help="tokens generated per prompt")
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    generate.add_argument("--top-k", type=int, default=50,
                          help="sample among the K most likely tokens (default 50, as transformers; 0: all)")
    generate.add_argument("--top-p", type=float, default=None, help="sample within this probability mass")
    generate.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    generate.add_argument("--batch-size", type=positive_int, default=8, help="generation slots for --prompts")
    generate.add_argument("--tensor-parallel", type=positive_int, default=1, help="tensor-parallel degree")
    generate.add_argument("--offload", action="store_true",
                          help="keep layer weights in remote buffers, backed by memory-mapped files")
    generate.add_argument("--offload-dir", default=None,
                          help="where --offload keeps its weight cache (default: inside --model)")
    generate.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                          help="dtype of the weights and activations")


def _token_ids(text: str) -> List[int]:
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


def main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``args.command`` (one of ``COMMANDS``); option errors exit through ``parser.error`` (code 2)."""
    _check_common(parser, args)
    return _validate(parser, args) if args.command == "validate" else _generate(parser, args)


def _check_common(parser, args) -> None:
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: no such directory")
    if args.command == "validate":
        if args.few_shot < 0:
            parser.error(f"--few-shot must be >= 0, got {args.few_shot}")
        if args.few_shot and args.few_shot_data is None:
            parser.error("--few-shot needs --few-shot-data")
        for option, path in (("--data", args.data), ("--few-shot-data", args.few_shot_data)):
            if path is not None:
                _check_data_path(parser, option, path)
    else:
        if args.temperature <= 0:
            parser.error(f"--temperature must be > 0, got {args.temperature}")
        if args.top_k < 0:
            parser.error(f"--top-k must be >= 0, got {args.top_k}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
        if args.prompts is not None and not os.path.isfile(args.prompts):
            parser.error(f"--prompts {args.prompts}: no such file")
        if args.offload_dir is not None and not args.offload:
            parser.error("--offload-dir needs --offload")
        if args.seed is not None and args.seed < 0:
            parser.error(f"--seed must be >= 0, got {args.seed}")


def _check_data_path(parser, option: str, path: str) -> None:
    if not os.path.isfile(path):
        parser.error(f"{option} {path}: no such file")
    if os.path.splitext(path)[1] not in _DATA_FORMATS:
        parser.error(f"{option} {path}: expected one of {', '.join(sorted(_DATA_FORMATS))}")


def _load_model(parser, args):
    from gptj_popxl.model.gptj import from_pretrained
    try:
        return from_pretrained(args.model, tensor_parallel=args.tensor_parallel,
                               dtype=getattr(args, "dtype", "float32"), offload=getattr(args, "offload", False),
                               offload_cache_dir=getattr(args, "offload_dir", None))
    except FileExistsError as e:  # --offload-dir names a folder of other data
        parser.error(f"--offload-dir: {e}")


def _load(parser, args, needs_eos: bool):
    """The model and its tokenizer (checked first: it loads in a moment)."""
    from gptj_popxl.data import load_tokenizer
    try:
        tokenizer = load_tokenizer(args.model, needs_eos)
    except ValueError as e:
        parser.error(f"--model {e}")
    return _load_model(parser, args), tokenizer


def peak_memory_bytes() -> int:
    """This process's peak resident memory so far (``getrusage`` ``ru_maxrss``, KiB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_mnli_rows(path: str, option: str = "--data") -> List[Dict]:
    """MNLI rows ``{premise, hypothesis, label}`` of a json/jsonl/csv/parquet file; ``label`` is a
    label id (0-2) or word, returned as the id.

    Raises:
        ValueError: a missing column or an unknown label, naming the option, row and value.
    """
    import datasets
    table = datasets.load_dataset(_DATA_FORMATS[os.path.splitext(path)[1]], data_files=path, split="train")
    missing = {"premise", "hypothesis", "label"} - set(table.column_names)
    if missing:
        raise ValueError(f"{option} {path}: missing column(s) {sorted(missing)} (has {table.column_names})")
    rows = []
    for i, row in enumerate(table):
        label = row["label"]
        if isinstance(label, str) and label in LABEL_WORDS:
            label = LABEL_WORDS.index(label)
        if label not in range(len(LABEL_WORDS)):
            raise ValueError(f"{option} {path}: row {i} has label {row['label']!r}; expected 0-2 or one of "
                             f"{LABEL_WORDS}")
        rows.append({"premise": row["premise"], "hypothesis": row["hypothesis"], "label": int(label)})
    return rows


def few_shot_prefix(examples: Sequence[Dict]) -> str:
    """Solved examples, one per line, to put before a prompt."""
    return "".join(f"{mnli_prompt(e['premise'], e['hypothesis'])} {LABEL_WORDS[e['label']]}\n" for e in examples)


def parse_label(completion: str) -> str:
    """The label word that ``completion`` (text up to end-of-text) exactly is, else "unknown"."""
    word = completion.strip()
    return word if word in LABEL_WORDS else UNKNOWN


def _completion(tokenizer, tokens: Sequence[int]) -> str:
    """Text of generated ``tokens`` up to (not including) the end-of-text token."""
    tokens = list(tokens)
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens)


def _generate_in_groups(model, prompts: List[List[int]], batch_size: int, desc: str, **options):
    """``model.generate_many`` over ``prompts`` in groups, with a progress bar."""
    from tqdm import tqdm
    group = batch_size * PROMPTS_PER_SLOT
    outputs = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(prompts), group):
            part = prompts[start:start + group]
            outputs.extend(model.generate_many(part, batch_size=batch_size, **options))
            bar.update(len(part))
    return outputs


def confusion_table(counts: np.ndarray) -> str:
    """Rows: true labels; columns: predictions, with "unknown" last."""
    columns = list(LABEL_WORDS) + [UNKNOWN]
    width = max(map(len, columns)) + 2
    lines = ["true \\ predicted".ljust(width) + "".join(c.rjust(width) for c in columns)]
    for label, row in zip(LABEL_WORDS, counts):
        lines.append(label.ljust(width) + "".join(str(int(n)).rjust(width) for n in row))
    return "\n".join(lines)


def _validate(parser, args) -> int:
    try:
        rows = read_mnli_rows(args.data)
        shots = read_mnli_rows(args.few_shot_data, "--few-shot-data")[: args.few_shot] if args.few_shot else []
    except ValueError as e:
        parser.error(str(e))
    if args.few_shot > len(shots):
        parser.error(f"--few-shot {args.few_shot}: --few-shot-data has only {len(shots)} rows")
    rows = rows[: args.limit] if args.limit else rows
    if not rows:
        parser.error(f"--data {args.data}: no rows")
    model, tokenizer = _load(parser, args, needs_eos=True)
    prefix = few_shot_prefix(shots)
    prompts = [tokenizer(prefix + mnli_prompt(r["premise"], r["hypothesis"]))["input_ids"] for r in rows]
    longest = max(map(len, prompts))
    if longest + args.max_new_tokens > model.config.n_positions:
        parser.error(f"prompts of up to {longest} tokens + --max-new-tokens {args.max_new_tokens} exceed the model's "
                     f"n_positions ({model.config.n_positions}); lower --few-shot or --max-new-tokens")
    began = time.perf_counter()
    outputs = _generate_in_groups(model, prompts, args.batch_size, "validate", max_new_tokens=args.max_new_tokens,
                                  eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - began
    counts = np.zeros((len(LABEL_WORDS), len(LABEL_WORDS) + 1), np.int64)
    columns = list(LABEL_WORDS) + [UNKNOWN]
    for row, out in zip(rows, outputs):
        counts[row["label"], columns.index(parse_label(_completion(tokenizer, out)))] += 1
    correct = int(np.trace(counts[:, : len(LABEL_WORDS)]))
    print(f"accuracy: {correct / len(rows):.3f} ({correct}/{len(rows)})")
    print(confusion_table(counts))
    tokens = sum(len(o) for o in outputs)
    print(f"throughput: {len(rows) / seconds:.1f} examples/s, {tokens / seconds:.1f} generated tokens/s "
          f"({seconds:.2f} s)")
    return 0


def _read_prompts(path: str) -> List[str]:
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if path.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def _generate_ids(parser, args) -> int:
    """``--prompt-ids``: greedy or sampled ids, then the load time, tokens/s and peak memory."""
    began = time.perf_counter()
    model = _load_model(parser, args)
    loaded = time.perf_counter()
    ids = np.array(args.prompt_ids)
    if ids.max() >= model.config.vocab_size:
        parser.error(f"--prompt-ids: id {ids.max()} is outside the vocabulary (size {model.config.vocab_size})")
    if len(ids) + args.max_new_tokens > model.config.n_positions:
        parser.error(f"--prompt-ids: {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceed the model's "
                     f"n_positions ({model.config.n_positions})")
    out = model.generate(ids[None], max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    seconds = time.perf_counter() - loaded
    print(json.dumps({"prompt_ids": ids.tolist(), "generated_ids": out[0, len(ids):].tolist()}))
    print(f"load: {loaded - began:.1f} s; generation: {args.max_new_tokens} tokens in {seconds:.1f} s "
          f"({args.max_new_tokens / seconds:.3f} tokens/s, programs' compile included); "
          f"peak memory (ru_maxrss): {peak_memory_bytes() / 2**30:.2f} GiB")
    return 0


def _generate(parser, args) -> int:
    if args.prompt_ids is not None:
        return _generate_ids(parser, args)
    model, tokenizer = _load(parser, args, needs_eos=False)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=tokenizer.eos_token_id)
    texts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts)
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    for text, ids in zip(texts, prompts):
        if not ids:
            parser.error(f"prompt {text!r} has no tokens")
        if len(ids) + args.max_new_tokens > model.config.n_positions:
            parser.error(f"prompt {text[:40]!r}...: {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} "
                         f"exceed the model's n_positions ({model.config.n_positions})")
    if args.prompt is not None:
        _stream_to_terminal(model, tokenizer, prompts[0], options)
        return 0
    outputs = _generate_in_groups(model, prompts, args.batch_size, "generate", **options)
    for text, out in zip(texts, outputs):
        print(json.dumps({"prompt": text, "completion": _completion(tokenizer, out), "tokens": out.tolist()}))
    return 0


def _stream_to_terminal(model, tokenizer, prompt: List[int], options) -> None:
    """Print the completion as its tokens come (text re-decoded so multi-token characters print whole)."""
    sys.stdout.write(tokenizer.decode(prompt))
    tokens, shown = [], ""
    for token in model.stream(np.array(prompt), **options):
        if token == tokenizer.eos_token_id:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
