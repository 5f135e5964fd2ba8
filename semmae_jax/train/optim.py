"""Optimizers as the original's training scripts build them, with optax, driven by tables.

Per-parameter behaviour is decided by regex tables over parameter paths
('blocks_3/mlp/fc1/kernel'), the first match winning, and is logged once at start:

* `NO_WEIGHT_DECAY`: 1-d parameters (norms, biases), tokens and position tables.
  (MAE's pretraining used timm-0.3.2's `add_weight_decay` with an empty skip list,
  which decays `cls_token` and `mask_token`; we apply its fine-tuning rule, which
  exempts them, in both; `ORIGINAL_PRETRAIN_NO_WEIGHT_DECAY` is the original's rule,
  `pretrain --decay_tokens`.)
* frozen parameters (MAE's sin-cos tables) get no update and no optimizer state.
* layer-wise lr decay (fine-tuning) is an lr-multiplier table: `layer_id` gives 0 to
  cls_token / pos_embed / patch_embed, i+1 to block i, depth+1 to the rest, and the
  multiplier is decay ** (depth + 1 - layer_id), as MAE's `param_groups_lrd`.

The learning rate (`semmae_jax/training_length.py`) follows MAE's `adjust_learning_rate`:
linear warm-up from 0, then a half-cycle cosine down to `min_lr`, evaluated at every
optimizer update (not per epoch).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from semmae_jax.key_paths import TOKENS_AND_TABLES, flat_by_path, map_with_path
from semmae_jax.models import layer_id

NO_WEIGHT_DECAY = (r"/bias$", r"/scale$", TOKENS_AND_TABLES)
ORIGINAL_PRETRAIN_NO_WEIGHT_DECAY = (r"/bias$", r"/scale$")  # the position tables are frozen there


def matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def weight_decay_mask(params: Any, no_decay: Sequence[str] = NO_WEIGHT_DECAY) -> Any:
    """True where weight decay applies: parameters of more than one dimension not matched by `no_decay`."""
    return map_with_path(lambda path, x: x.ndim > 1 and not matches(path, no_decay), params)


def layer_decay_scales(params: Any, depth: int, decay: float) -> Any:
    """The lr multiplier of every parameter under layer-wise decay."""
    return map_with_path(lambda path, x: decay ** (depth + 1 - layer_id(path, depth)), params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor (the layer-decay table)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, s: u * s, updates, scales))


def adamw(
    params: Any,
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    betas: tuple[float, float],
    frozen: Sequence[str] = (),
    lr_scales: Any = None,
    clip_grad: float | None = None,
    no_decay: Sequence[str] = NO_WEIGHT_DECAY,
) -> optax.GradientTransformation:
    """Torch-style AdamW (decoupled decay, eps 1e-8) with the tables above.

    `frozen` names top-level parameters that are never updated; `clip_grad` clips the
    (averaged) gradient's global norm first; `no_decay` the paths exempt from decay.
    """
    parts = [optax.clip_by_global_norm(clip_grad)] if clip_grad else []
    parts += [
        optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=1e-8),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(params, no_decay)),
        optax.scale_by_learning_rate(schedule),
    ]
    if lr_scales is not None:
        parts.append(scale_by_tree(lr_scales))
    tx = optax.chain(*parts)
    if frozen:
        labels = map_with_path(lambda path, x: "frozen" if path.split("/")[0] in frozen else "train", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def accumulate(tx: optax.GradientTransformation, accum_iter: int) -> optax.GradientTransformation:
    """MAE's `--accum_iter` for any optimizer: average the gradients of `accum_iter`
    micro-batches, then make one update (the schedule counts updates, not micro-batches;
    `--accum_iter` is validated with the flags)."""
    return optax.MultiSteps(tx, every_k_schedule=accum_iter) if accum_iter > 1 else tx


def describe_param_groups(params: Any, lr_scales: Any = None, frozen: Sequence[str] = (),
                          no_decay: Sequence[str] = NO_WEIGHT_DECAY) -> list[str]:
    """One line per parameter: decay on/off, lr multiplier, frozen; logged once at start."""
    decay = flat_by_path(weight_decay_mask(params, no_decay))
    scales = flat_by_path(lr_scales) if lr_scales is not None else {}
    lines = []
    for path, leaf in flat_by_path(params).items():
        rule = (
            "frozen"
            if path.split("/")[0] in frozen
            else f"wd={'on' if decay[path] else 'off'} lr_scale={scales.get(path, 1.0):.4g}"
        )
        lines.append(f"{path} {tuple(leaf.shape)} {rule}")
    return lines


def lars(
    params: Any, schedule: optax.Schedule, *, weight_decay: float = 0.0, momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> optax.GradientTransformation:
    """MAE's `util/lars.py` LARS: for >1-d params, decay then the trust ratio; momentum; lr.

    The order matters with a schedule: the original accumulates momentum on the unscaled
    update and multiplies by the current lr at application (`p -= lr * mu`), so the
    learning rate comes last here (optax's own `lars` scales before the momentum).
    """
    matrices = map_with_path(lambda path, x: x.ndim > 1, params)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=matrices),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=0.0), matrices),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(schedule),
    )
