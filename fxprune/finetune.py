"""Fine-tuning a pruned model with knowledge distillation from the original, on one process or many.

Under ``torchrun`` (an initialised ``torch.distributed`` process group) the model is wrapped in
DistributedDataParallel and each process takes every ``world_size``-th batch of ``data`` (pass a DataLoader
with a DistributedSampler instead if you prefer; then give ``shard=False``).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .errors import InvalidArgumentError


LOSSES = ("auto", "kl", "mse", "cosine")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      loss: str = "auto") -> torch.Tensor:
    """``kl``: KL divergence between softened class distributions (times T²); ``mse``; ``cosine``: one minus the
    cosine similarity along the last dim (for features). ``auto``: kl for (batch, classes) outputs, else mse."""
    if loss not in LOSSES:
        raise InvalidArgumentError(f"fxprune: unknown distillation loss {loss!r}; choose from {LOSSES}")
    if loss == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if loss == "kl" or (loss == "auto" and student.ndim == 2 and student.shape[1] > 1):
        t = temperature
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                        log_target=True) * t * t
    return F.mse_loss(student, teacher)


def _split(item) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
        label = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
        return item[0], label
    raise InvalidArgumentError(f"fxprune: a fine-tuning batch must be a tensor or (inputs, labels), got {type(item).__name__}")


def finetune(pruned: nn.Module, data: Iterable, teacher: nn.Module | None = None, *, epochs: int = 1,
             lr: float = 1e-4, weight_decay: float = 0.05, temperature: float = 1.0, label_weight: float = 0.0,
             max_steps: int | None = None, shard: bool = True, progress: bool = True, loss: str = "auto") -> nn.Module:
    """Train ``pruned`` (in place; returned) to match ``teacher`` (the original model) on ``data``.

    Loss: ``(1 - label_weight) * distillation + label_weight * cross_entropy(labels)`` when batches carry labels,
    else distillation only (``loss``: see ``distillation_loss``; "cosine" or "mse" for feature extractors). AdamW with
    a cosine learning-rate schedule. Without a teacher, labels are required.
    """
    if loss not in LOSSES:
        raise InvalidArgumentError(f"fxprune: unknown distillation loss {loss!r}; choose from {LOSSES}")
    from tqdm.auto import tqdm

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    batches = list(data)
    if shard and distributed:
        batches = batches[rank::world]
    if not batches:
        raise InvalidArgumentError("fxprune: fine-tuning needs at least one batch (per process)")
    total = epochs * len(batches) if max_steps is None else min(max_steps, epochs * len(batches))
    student = nn.parallel.DistributedDataParallel(pruned) if distributed else pruned
    if teacher is not None:
        teacher = teacher.eval()
    optimiser = torch.optim.AdamW([p for p in pruned.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    pruned.train()
    step = 0
    bar = tqdm(total=total, desc="fxprune finetune", disable=not progress or rank != 0)
    while step < total:
        for item in batches:
            if step >= total:
                break
            inputs, labels = _split(item)
            output = student(inputs)
            objective = torch.zeros((), dtype=output.dtype)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(inputs)
                objective = objective + (1 - label_weight if labels is not None else 1.0) * distillation_loss(
                    output, target, temperature, loss)
            if labels is not None and (label_weight > 0 or teacher is None):
                objective = objective + (label_weight if teacher is not None else 1.0) * F.cross_entropy(output, labels)
            if teacher is None and labels is None:
                raise InvalidArgumentError("fxprune: fine-tuning without a teacher needs labelled batches")
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            optimiser.step()
            schedule.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=float(objective.detach()))
    bar.close()
    return pruned.eval()
