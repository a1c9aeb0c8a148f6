"""Text generation on the host side: ``generate``, ``generate_many`` (continuous batching) and ``stream``.

The semantics are those of transformers' ``GPTJForCausalLM.generate``: left-padded rows with an
attention mask whose positions count only real tokens, rows padded with ``pad_token_id`` after
their ``eos_token_id``, an early stop when every row has finished, and sampling warped by
temperature, then top-k, then top-p. The device work is in ``programs.generation``: a prefill
per group of prompts, then decode runs of ``chunk`` tokens; between runs the host checks eos
and refills finished slots.
"""
import math
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from gptj_popxl.model.config import is_positive_int, tp_layout
from gptj_popxl.programs.generation import MASKED, Sampling, build_decode, build_prefill

# Most decode steps per run: a run costs a host round trip, and steps after every row has
# finished (or past max_new_tokens) are wasted. With the decode kernels (a step of the benchmark
# model, bench_generate.py, takes some 2.5 ms on one thread) the round trip shows: 32 new tokens
# took 94 / 89 / 86 ms at batch 1 and 140 / 137 / 130 ms at batch 4 with 8 / 16 / 32 steps per
# run (medians of 7, one thread, shared machine); 16 takes most of that gain and keeps early stops
# and refills within 16 steps.
DECODE_CHUNK = 16
# Most decode steps per run when no row can stop early (``generate`` without an eos token): all the
# new tokens in as few runs as possible, so that no step is wasted rounding them up to runs of
# equal length (32 new tokens: 31 steps in one run rather than two runs of 16).
DECODE_CHUNK_TO_THE_END = 64
# Smallest prompt bucket; buckets double from it up to FINE_BUCKETS_FROM, then take four equal steps
# per doubling (64, 80, 96, 112, 128, 160, ...).
MIN_BUCKET = 8
FINE_BUCKETS_FROM = 64


def prompt_bucket(length: int, n_positions: int) -> int:
    """The padded prompt length programs are compiled for, capped at ``n_positions``: the power of two
    from ``MIN_BUCKET`` at least ``length`` up to ``FINE_BUCKETS_FROM`` columns, then the next quarter
    step of ``length``'s doubling. A prefill costs as its padded length: a power-of-two bucket could
    nearly double a long prompt's work (400 columns padded to 512 made a 4-layer prefill 0.77x
    transformers'), a quarter step pads by at most a quarter, for four programs per doubling."""
    bucket = MIN_BUCKET
    while bucket < min(length, FINE_BUCKETS_FROM):
        bucket *= 2
    if length > bucket:
        step = (1 << (length - 1).bit_length() - 1) // 4  # a quarter of the largest power of two below length
        bucket = -(-length // step) * step
    return max(length, min(bucket, n_positions))


def decode_chunking(steps: int, max_chunk: Optional[int] = None):
    """``(chunk, runs)``: ``steps`` decode steps in ``runs`` runs of ``chunk <= max_chunk`` steps
    (default ``DECODE_CHUNK``)."""
    if steps <= 0:
        return 1, 0
    runs = math.ceil(steps / (max_chunk or DECODE_CHUNK))
    return math.ceil(steps / runs), runs


def decode_layout(prompt_len: int, max_new_tokens: int, max_chunk: Optional[int] = None):
    """``(chunk, cache_len)`` of a decode program for prompts of ``prompt_len`` columns: the prefill
    makes the first new token, the decode runs the rest in runs of ``chunk`` steps, and the cache
    holds the prompt and every run's columns."""
    chunk, runs = decode_chunking(max_new_tokens - 1, max_chunk)
    return chunk, prompt_len + runs * chunk


# transformers' GenerationConfig samples among the 50 most likely tokens unless told otherwise.
DEFAULT_TOP_K = 50


def eos_ids(eos_token_id) -> Optional[np.ndarray]:
    """``eos_token_id`` (None, an int or a list of ints, as transformers takes it) as an array of ids."""
    if eos_token_id is None:
        return None
    ids = np.atleast_1d(np.asarray(eos_token_id))
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids


def sampling_options(do_sample: bool, temperature, top_k, top_p) -> Optional[Sampling]:
    """The ``Sampling`` of these generate options (None: greedy), after checking them."""
    if not isinstance(do_sample, (bool, np.bool_)):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    if not do_sample:
        return None
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    # As transformers: top_k=0 and top_p=1 switch those warpers off.
    return Sampling(float(temperature), top_k or None, None if top_p in (None, 1, 1.0) else float(top_p))


def _is_int(value) -> bool:
    """A python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def sampling_rng(seed) -> np.random.Generator:
    """The random generator sampling draws from, seeded with ``seed`` (None: fresh entropy)."""
    if seed is not None and not (_is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    return np.random.default_rng(seed)


def _left_pad(prompts: Sequence[np.ndarray], length: int):
    """``(ids, mask)`` (n, length): the prompts right-aligned, zeros on the left."""
    ids = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = p
        mask[row, length - len(p):] = 1
    return ids, mask


class Generator:
    """Compiled generation programs of one model, by shape, built on first use."""

    def __init__(self, model):
        self.model = model
        self._programs: Dict[tuple, object] = {}

    @property
    def programs(self) -> List[object]:
        """The programs built so far."""
        return list(self._programs.values())

    def prefill(self, batch: int, seq: int, sampling: Optional[Sampling], with_logits: bool = False):
        key = ("prefill", batch, seq, sampling, with_logits)
        if key not in self._programs:
            self._programs[key] = build_prefill(self.model, batch, seq, sampling, with_logits)
        return self.model.with_current_weights(self._programs[key])

    def decode(self, batch: int, prompt_len: int, cache_len: int, chunk: int, sampling: Optional[Sampling],
               with_logits: bool = False):
        key = ("decode", batch, prompt_len, cache_len, chunk, sampling, with_logits)
        if key not in self._programs:
            self._programs[key] = build_decode(self.model, batch, prompt_len, cache_len, chunk, sampling,
                                               with_logits)
        return self.model.with_current_weights(self._programs[key])

    def generate(self, input_ids, **options) -> np.ndarray:
        return generate(self, input_ids, **options)

    def generate_many(self, prompts, **options) -> List[np.ndarray]:
        return generate_many(self, prompts, **options)

    def stream(self, prompt_ids, **options) -> Iterator[int]:
        return stream(self, prompt_ids, **options)


class Slots:
    """``batch`` rows decoded together, each refillable with a new prompt between decode runs.

    The cache stays in the decode program's variables, a ring of ``cache_len`` columns: every
    row writes column ``column`` at the next step, and a refilled row's prompt goes into the
    ``prompt_len`` columns before it. A row lives at most ``cache_len - prompt_len`` steps after
    its refill, so its writes never reach its prompt. The host mirrors each row's last token,
    position and mask. With ``with_logits``, ``logits`` holds the full-vocabulary logits of the
    last ``start`` (n, vocab) or ``advance`` (batch, chunk, vocab).
    """

    def __init__(self, generator: Generator, batch: int, prompt_len: int, max_new_tokens: int,
                 sampling: Optional[Sampling], rng: np.random.Generator, with_logits: bool = False,
                 max_chunk: Optional[int] = None):
        model = generator.model
        self.generator, self.sampling, self.rng, self.with_logits = generator, sampling, rng, with_logits
        self.logits: Optional[np.ndarray] = None
        self.config, self.tp = model.config, model.tensor_parallel
        self.batch, self.prompt_len = batch, prompt_len
        self.chunk, self.cache_len = decode_layout(prompt_len, max_new_tokens, max_chunk)
        self.column = prompt_len % self.cache_len
        self.token = np.zeros((batch, 1), np.int32)
        self.position = np.zeros((batch, 1), np.int32)
        self.mask = np.full((batch, 1, 1, self.cache_len), MASKED, np.float32)
        self.refill = np.zeros((batch,), bool)
        heads, head_dim = tp_layout(self.config, self.tp).heads_per_shard, self.config.head_dim
        dtype = np.dtype(model.dtype)
        self.fresh = {f"k.{i}": np.zeros((self.tp, batch, heads, head_dim, prompt_len), dtype)
                      for i in range(self.config.n_layer)}
        self.fresh.update({f"v.{i}": np.zeros((self.tp, batch, heads, prompt_len, head_dim), dtype)
                           for i in range(self.config.n_layer)})

    def _uniforms(self, *shape) -> Dict[str, np.ndarray]:
        if self.sampling is None:
            return {}
        total = self.sampling.candidates(self.config, self.tp)[1]
        return {"uniforms": self.rng.random(shape + (total,), dtype=np.float32)}

    def _full_vocab(self, shards: np.ndarray) -> np.ndarray:
        """Logits shards (tp, ..., vocab_per_shard) as (..., vocab_size)."""
        shards = shards if self.tp > 1 else shards[None]
        return np.concatenate(list(shards), axis=-1)[..., :self.config.vocab_size]

    def _window(self) -> int:
        """The first cache column of a prompt refilled now."""
        return (self.column - self.prompt_len) % self.cache_len

    def start(self, rows: Sequence[int], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Prefill left-padded prompts ``ids`` (with ``mask``) into ``rows``; returns their first tokens."""
        n, seq = ids.shape
        bucket = prompt_bucket(seq, self.config.n_positions)
        ids = np.pad(ids, ((0, 0), (bucket - seq, 0)))
        mask = np.pad(mask, ((0, 0), (bucket - seq, 0))).astype(bool)
        positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 1)
        allowed = np.tril(np.ones((bucket, bucket), bool))[None] & mask[:, None, :]
        program = self.generator.prefill(n, bucket, self.sampling, self.with_logits)
        out = program.run(input_ids=ids, positions=positions, mask=np.where(allowed, 0.0, MASKED)[:, None],
                          **self._uniforms(n))
        first = out.pop("token").reshape((self.tp, n))[0]
        if self.with_logits:
            self.logits = self._full_vocab(out.pop("logits"))
        # The prompt ends just before the next write column.
        columns = (self._window() + self.prompt_len - bucket + np.arange(bucket)) % self.cache_len
        for name, kv in out.items():
            kv = kv.reshape((self.tp, n) + kv.shape[-3:])
            # Keys are cached transposed: their columns are the last axis, the values' the one before.
            kv, axis = (kv.swapaxes(-1, -2), -1) if name[0] == "k" else (kv, -2)
            fresh = np.moveaxis(self.fresh[name], axis, -1)
            for j, row in enumerate(rows):
                fresh[:, row] = 0
                fresh[:, row, ..., self.prompt_len - bucket:] = np.moveaxis(kv[:, j], axis, -1)
        for j, row in enumerate(rows):
            self.refill[row] = True
            self.token[row] = first[j]
            self.position[row] = mask[j].sum()
            self.mask[row] = MASKED
            self.mask[row, 0, 0, columns[mask[j]]] = 0.0
        return first.astype(np.int64)

    def advance(self) -> np.ndarray:
        """One decode run: every row's next ``chunk`` tokens, (batch, chunk)."""
        program = self.generator.decode(self.batch, self.prompt_len, self.cache_len, self.chunk, self.sampling,
                                        self.with_logits)
        out = program.run(token=self.token, position=self.position, column=np.int32([self.column]), mask=self.mask,
                          refill=self.refill, window=np.int32([self._window()]), **self.fresh,
                          **self._uniforms(self.chunk, self.batch))
        tokens = out["tokens"].reshape((self.tp, self.batch, self.chunk))[0]
        if self.with_logits:
            self.logits = self._full_vocab(out["logits"])
        self.refill[:] = False
        self.mask[:, 0, 0, (self.column + np.arange(self.chunk)) % self.cache_len] = 0.0
        self.column = (self.column + self.chunk) % self.cache_len
        self.position = np.minimum(self.position + self.chunk, self.config.n_positions - 1).astype(np.int32)
        self.token = tokens[:, -1:].copy()
        return tokens.astype(np.int64)


def _check_max_new_tokens(max_new_tokens) -> None:
    if not is_positive_int(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def _check_length(what: str, length: int, max_new_tokens: int, n_positions: int) -> None:
    if length + max_new_tokens > n_positions:
        raise ValueError(f"{what}: {length} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's "
                         f"n_positions ({n_positions})")


def generate_steps(generator: Generator, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                   sampling: Optional[Sampling], eos_token_id, pad_token_id: Optional[int],
                   seed: Optional[int], max_chunk: Optional[int] = None) -> Iterator[np.ndarray]:
    """Each step's new tokens (batch,) of left-padded rows, finished rows padded; stops when all finished.
    ``max_chunk``: most decode steps per run (tokens come a run at a time; default ``DECODE_CHUNK``)."""
    batch, seq = input_ids.shape
    slots = Slots(generator, batch, prompt_bucket(seq, generator.model.config.n_positions), max_new_tokens, sampling,
                  sampling_rng(seed), max_chunk=max_chunk)
    unfinished = np.ones(batch, bool)

    eos = eos_ids(eos_token_id)

    def emit(tokens: np.ndarray) -> np.ndarray:
        if eos is None:
            return tokens
        tokens = np.where(unfinished, tokens, pad_token_id)
        unfinished[np.isin(tokens, eos)] = False
        return tokens

    yield emit(slots.start(range(batch), input_ids, attention_mask))
    produced = 1
    while produced < max_new_tokens and unfinished.any():
        tokens = slots.advance()
        for j in range(slots.chunk):
            if produced == max_new_tokens or not unfinished.any():
                break
            yield emit(tokens[:, j])
            produced += 1


def generate(generator: Generator, input_ids, *, attention_mask=None, max_new_tokens=20, do_sample=False,
             temperature=1.0, top_k=DEFAULT_TOP_K, top_p=None, eos_token_id=None, pad_token_id=None,
             seed=None) -> np.ndarray:
    """See ``GPTJ.generate``."""
    ids, mask, sampling, pad = _generate_args(generator, input_ids, attention_mask, max_new_tokens, do_sample,
                                              temperature, top_k, top_p, eos_token_id, pad_token_id)
    max_chunk = DECODE_CHUNK_TO_THE_END if eos_token_id is None else None
    new = list(generate_steps(generator, ids, mask, max_new_tokens, sampling, eos_token_id, pad, seed, max_chunk))
    return np.concatenate([ids, np.stack(new, axis=1)], axis=1)


def stream(generator: Generator, prompt_ids, *, max_new_tokens=20, do_sample=False, temperature=1.0,
           top_k=DEFAULT_TOP_K, top_p=None, eos_token_id=None, seed=None) -> Iterator[int]:
    """See ``GPTJ.stream``."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1:
        raise ValueError(f"stream: prompt_ids must be one row of token ids (1-D), got shape {ids.shape}")
    ids, mask, sampling, pad = _generate_args(generator, ids[None], None, max_new_tokens, do_sample, temperature,
                                              top_k, top_p, eos_token_id, None)
    for tokens in generate_steps(generator, ids, mask, max_new_tokens, sampling, eos_token_id, pad, seed):
        yield int(tokens[0])


def _generate_args(generator, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                   eos_token_id, pad_token_id):
    from gptj_popxl.model.gptj import _check_ids
    config = generator.model.config
    ids = _check_ids("input_ids", input_ids, config, allow_ignore=False)
    _check_max_new_tokens(max_new_tokens)
    eos = eos_ids(eos_token_id)
    if attention_mask is None:
        # transformers infers the mask from a pad token that is not also an eos token.
        infer = (pad_token_id is not None and (eos is None or pad_token_id not in eos)
                 and (ids == pad_token_id).any())
        mask = (ids != pad_token_id).astype(np.int64) if infer else np.ones_like(ids)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the input_ids shape {ids.shape}, got shape {mask.shape}")
        other = mask[~np.isin(mask, (0, 1))]
        if other.size:
            raise ValueError(f"attention_mask must hold only 0 and 1, found {other[0].item()!r}")
        if not mask[:, -1].all():
            raise ValueError("attention_mask: rows must be left padded (every row's last token real)")
    _check_length("generate", ids.shape[1], max_new_tokens, config.n_positions)
    if pad_token_id is not None and not _is_int(pad_token_id):
        raise TypeError(f"pad_token_id must be an int or None, got {pad_token_id!r}")
    # As transformers: without a pad token, finished rows are padded with the (first) eos token.
    pad = (None if eos is None else int(eos[0])) if pad_token_id is None else pad_token_id
    return ids, mask.astype(np.int64), sampling_options(do_sample, temperature, top_k, top_p), pad


def generate_many(generator: Generator, prompts, *, batch_size=8, max_new_tokens=20, eos_token_id=None,
                  do_sample=False, temperature=1.0, top_k=DEFAULT_TOP_K, top_p=None, seed=None) -> List[np.ndarray]:
    """See ``GPTJ.generate_many``."""
    from gptj_popxl.model.gptj import _check_ids
    config = generator.model.config
    if not is_positive_int(batch_size):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _check_max_new_tokens(max_new_tokens)
    rows = []
    for i, p in enumerate(prompts):
        p = np.asarray(p)
        if p.ndim != 1:
            raise ValueError(f"prompts[{i}] must be a 1-D sequence of token ids, got shape {p.shape}")
        rows.append(_check_ids(f"prompts[{i}]", p[None], config, allow_ignore=False)[0])
        _check_length(f"prompts[{i}]", len(p), max_new_tokens, config.n_positions)
    eos = set() if eos_token_id is None else set(eos_ids(eos_token_id).tolist())
    sampling, rng = sampling_options(do_sample, temperature, top_k, top_p), sampling_rng(seed)
    results: List[Optional[np.ndarray]] = [None] * len(rows)
    if not rows:
        return []
    batch = min(batch_size, len(rows))
    slots = Slots(generator, batch, prompt_bucket(max(map(len, rows)), config.n_positions), max_new_tokens, sampling,
                  rng)
    owner: List[Optional[int]] = [None] * batch  # prompt index of each slot
    made: List[List[int]] = [[] for _ in rows]
    queue = iter(range(len(rows)))

    def add(slot: int, token: int) -> bool:
        """Record ``token`` for the slot's prompt; True when that prompt is done (slot freed)."""
        i = owner[slot]
        made[i].append(int(token))
        if int(token) in eos or len(made[i]) == max_new_tokens:
            results[i] = np.array(made[i], np.int64)
            owner[slot] = None
            return True
        return False

    def fill(slot: int) -> None:
        """Give a free ``slot`` prompts until one is still running after its first token (or none are left)."""
        while owner[slot] is None:
            i = next(queue, None)
            if i is None:
                return
            owner[slot] = i
            add(slot, slots.start([slot], *_left_pad([rows[i]], len(rows[i])))[0])

    initial = [next(queue) for _ in range(batch)]
    firsts = slots.start(range(batch), *_left_pad([rows[i] for i in initial], max(len(rows[i]) for i in initial)))
    for slot, (i, token) in enumerate(zip(initial, firsts)):
        owner[slot] = i
        if add(slot, token):
            fill(slot)
    while any(o is not None for o in owner):
        tokens = slots.advance()
        for slot in range(batch):
            if owner[slot] is None:
                continue
            for token in tokens[slot]:
                if add(slot, token):
                    break
            fill(slot)
    return results
