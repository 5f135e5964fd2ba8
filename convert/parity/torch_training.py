"""The PyTorch side of `parity --train`: MAE's three training scripts (pretraining, fine-tuning, linear probing) as they train.

Written after facebookresearch/mae (commit efb2a80), file by file, not copied:

- the loop of `engine_pretrain.py` / `engine_finetune.py` (`train_one_epoch`): the lr is set
  from the fractional epoch (`data_iter_step / len(data_loader) + epoch`) every `accum_iter`
  micro-batches by `util/lr_sched.py` (linear warm-up, then a half-cycle cosine to `min_lr`,
  times each group's `lr_scale`); the loss is divided by `accum_iter`, back-propagated, and
  every `accum_iter` micro-batches the gradient is clipped (`--clip_grad`), the optimizer
  steps and the gradients are zeroed;
- `main_pretrain.py`: AdamW (0.9, 0.95) over timm's weight-decay groups (1-d parameters and
  biases exempt, everything else, `cls_token` and `mask_token` included, decayed);
- `main_finetune.py`: `util/lr_decay.py`'s `param_groups_lrd` (layer ids, `lr_scale`, no decay
  for 1-d parameters and `no_weight_decay()`), AdamW (0.9, 0.999), timm's
  `LabelSmoothingCrossEntropy` (plain cross entropy at `--smoothing 0`);
- `main_linprobe.py`: the encoder frozen, the head `BatchNorm1d(affine=False, eps=1e-6)` +
  Linear, `util/lars.py`'s LARS, cross entropy.

`args` is the JAX job's config with `lr` set: its field names are the original's flag names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import param_groups_weight_decay

Batch = dict[str, np.ndarray]
POSITION_TABLES = ("embeddings.position_embeddings", "decoder_pos_embed")  # transformers' names


@dataclass
class TorchTraining:
    """A model, its optimizer over the original's groups, and the loss of one micro-batch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[Batch], torch.Tensor]
    args: Any  # lr, min_lr, warmup_epochs, epochs, accum_iter, clip_grad (None: no clipping)


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args: Any) -> float:
    """`util/lr_sched.py`: warm-up then half-cycle cosine, set on every group (times its `lr_scale`)."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def train(training: TorchTraining, batches: Sequence[Batch], steps_per_epoch: int) -> Iterator[tuple[float, float]]:
    """`train_one_epoch` over consecutive epochs: yields (mean loss of the update's micro-batches, lr)
    at every optimizer update."""
    model, optimizer, args = training.model, training.optimizer, training.args
    model.train(True)
    optimizer.zero_grad()
    losses: list[float] = []
    for micro, batch in enumerate(batches):
        epoch, it = divmod(micro, steps_per_epoch)
        if it % args.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, it / steps_per_epoch + epoch, args)
        loss = training.loss(batch)
        losses.append(loss.item())
        (loss / args.accum_iter).backward()
        if (it + 1) % args.accum_iter == 0:
            if getattr(args, "clip_grad", None) is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad()
            yield float(np.mean(losses)), lr
            losses = []


class LARS(torch.optim.Optimizer):
    """`util/lars.py`: for parameters of more than one dimension, weight decay and then the trust
    ratio `trust_coefficient * |p| / |update|` (1 where either norm is 0); then momentum on the
    update and `p -= lr * mu`. Biases and other 1-d parameters get neither decay nor trust ratio."""

    def __init__(self, params: Any, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(p_norm)
                    trust = torch.where(p_norm > 0.0,
                                        torch.where(u_norm > 0, group["trust_coefficient"] * p_norm / u_norm, one), one)
                    update = update.mul(trust)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """`util/lr_decay.py`'s `get_layer_id_for_vit`."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: torch.nn.Module, weight_decay: float, no_weight_decay_list: Sequence[str],
                     layer_decay: float) -> list[dict[str, Any]]:
    """`util/lr_decay.py`'s groups: one per (layer, decay or not), each with its `lr_scale`."""
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in no_weight_decay_list
        layer = layer_id_for_vit(name, num_layers)
        group = groups.setdefault(f"layer_{layer}_{'no_decay' if no_decay else 'decay'}", {
            "lr_scale": layer_decay ** (num_layers - layer), "weight_decay": 0.0 if no_decay else weight_decay,
            "params": []})
        group["params"].append(param)
    return list(groups.values())


def pretrain(model: torch.nn.Module, args: Any) -> TorchTraining:
    """`main_pretrain.py`: transformers' ViTMAEForPreTraining fed the JAX step's masking noise.

    The sin-cos position tables are frozen, as `models_mae.py`'s (`requires_grad=False`):
    transformers' `from_pretrained` hands them back trainable.
    """
    for name, param in model.named_parameters():
        if name.endswith(POSITION_TABLES):
            param.requires_grad = False
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))

    def loss(batch: Batch) -> torch.Tensor:
        return model(pixel_values=nchw(batch["image"]), noise=torch.from_numpy(batch["noise"])).loss

    return TorchTraining(model, optimizer, loss, args)


def finetune(model: torch.nn.Module, args: Any) -> TorchTraining:
    """`main_finetune.py` without mixup, random erasing and drop path: timm's VisionTransformer."""
    groups = param_groups_lrd(model, args.weight_decay, sorted(model.no_weight_decay()), args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else torch.nn.CrossEntropyLoss()
    return TorchTraining(model, optimizer, lambda b: criterion(model(nchw(b["image"])), labels(b)), args)


def linprobe(encoder: torch.nn.Module, head: torch.nn.Linear, args: Any) -> TorchTraining:
    """`main_linprobe.py`: `encoder` (a timm VisionTransformer without head) gets the BatchNorm +
    `head` as its head; everything but the head frozen; LARS over the head."""
    encoder.head = torch.nn.Sequential(torch.nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
    for param in encoder.parameters():
        param.requires_grad = False
    for param in encoder.head.parameters():
        param.requires_grad = True
    optimizer = LARS(encoder.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    return TorchTraining(encoder, optimizer, lambda b: criterion(encoder(nchw(b["image"])), labels(b)), args)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def labels(batch: Batch) -> torch.Tensor:
    return torch.from_numpy(batch["label"].astype(np.int64))
