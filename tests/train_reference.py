"""The independent reference of the training tests: transformers' GPTJForCausalLM trained with
torch.optim.AdamW, clip_grad_norm_ and transformers' schedules, as transformers' Trainer does."""
import dataclasses

import numpy as np
import torch
import transformers

from gptj_popxl.model.layers import IGNORE_INDEX


@dataclasses.dataclass
class ReferenceRun:
    losses: list
    grad_norms: list
    state_dict: dict


def train_batches(vocab: int, rows: int, seq: int, steps: int, seed: int = 0):
    """``steps`` random (ids, labels) batches, about a third of the labels ignored (so token counts
    differ between rows, micro-batches and replicas)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, vocab, size=(rows, seq), dtype=np.int64)
        labels = np.where(rng.random((rows, seq)) < 0.35, IGNORE_INDEX, ids)
        labels[0, 1] = ids[0, 1]  # at least one token counts
        out.append((ids, labels))
    return out


def load_hf(model_dir, dtype=torch.float32):
    model = transformers.GPTJForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager")
    model.eval()  # no dropout
    return model


def reference_training(model_dir, cfg, batches) -> ReferenceRun:
    """Train transformers' model on ``batches`` with ``cfg``'s (a TrainingConfig) optimizer settings."""
    model = load_hf(model_dir)
    decay_names = transformers.trainer_pt_utils.get_parameter_names(model, [torch.nn.LayerNorm])
    decay = [p for n, p in model.named_parameters() if n in decay_names and "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (n in decay_names and "bias" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.lr_schedule == "linear":
        schedule = transformers.get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.total_steps)
    else:
        schedule = transformers.get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    losses, norms = [], []
    for ids, labels in batches:
        opt.zero_grad()
        loss = model(torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
        opt.step()
        schedule.step()
        losses.append(loss.item())
    return ReferenceRun(losses, norms, {n: p.detach().numpy().copy() for n, p in model.named_parameters()})


def max_relative_error(ours: dict, ref: dict) -> dict:
    """Per tensor ``max |ours - ref| / max |ref|``."""
    assert sorted(ours) == sorted(ref)
    errors = {}
    for n in ref:
        scale = max(float(np.max(np.abs(ref[n]))), 1e-30)
        errors[n] = float(np.max(np.abs(np.asarray(ours[n], np.float64) - ref[n]))) / scale
    return errors
