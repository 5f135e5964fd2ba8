"""Mixup / CutMix and the soft-target losses of MAE's fine-tuning, in JAX, with timm's semantics.

MAE builds `timm.data.Mixup(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob,
mode, label_smoothing, num_classes)` and trains with `SoftTargetCrossEntropy` on its
targets (`LabelSmoothingCrossEntropy` when mixing is off). Here the mixing runs on the
device inside the jitted step, on the global (possibly sharded) NHWC batch, with draws
from a JAX key, so that a step's mix depends only on (seed, step):

* every image i is mixed with image B - 1 - i (timm's `x.flip(0)`);
* mode 'batch': one decision (mix or not, CutMix or Mixup) and one lambda for the batch;
  'pair': one per pair (i, B - 1 - i); 'elem': one per image. All three are one
  vectorised computation on per-image parameters: 'batch' broadcasts them, 'pair' mirrors;
* Mixup blends `lam * x + (1 - lam) * x_flipped`; CutMix pastes the flipped batch's box
  from `rand_bbox` (a centre uniform on the image, sides `int(H sqrt(1 - lam))`, clipped)
  or `rand_bbox_minmax`, and lambda becomes 1 - box area / image area (`correct_lam`);
* targets `lam * y + (1 - lam) * y.flip(0)` with y smoothed one-hot
  (off = smoothing / classes, on = 1 - smoothing + off).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

MixMode = Literal["batch", "pair", "elem"]


@dataclasses.dataclass(frozen=True)
class MixupConfig:
    """The original's mixup flags, by name; defaults are its argparse defaults (mixing off).

    MAE's fine-tuning recipe sets `mixup=0.8, cutmix=1.0` (and keeps `smoothing=0.1`).
    """

    mixup: float = 0.0  # --mixup: Beta(alpha, alpha) of Mixup; active if > 0
    cutmix: float = 0.0  # --cutmix: Beta(alpha, alpha) of CutMix; active if > 0
    cutmix_minmax: tuple[float, float] | None = None  # --cutmix_minmax: box side fractions instead of alpha
    mixup_prob: float = 1.0  # --mixup_prob: probability of mixing a batch / pair / image
    mixup_switch_prob: float = 0.5  # --mixup_switch_prob: CutMix instead of Mixup when both are active
    mixup_mode: MixMode = "batch"  # --mixup_mode
    smoothing: float = 0.1  # --smoothing: label smoothing of the (mixed) targets
    nb_classes: int = 1000  # --nb_classes
    correct_lam: bool = True  # timm's default: lambda from the clipped box's area

    def __post_init__(self) -> None:
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"--mixup_mode {self.mixup_mode!r} is not one of 'batch', 'pair', 'elem'")
        if self.cutmix_minmax is not None:
            if len(self.cutmix_minmax) != 2:
                raise ValueError(f"--cutmix_minmax needs two values, got {self.cutmix_minmax}")
            object.__setattr__(self, "cutmix_minmax", tuple(self.cutmix_minmax))  # argparse gives a list; keep hashable

    @property
    def enabled(self) -> bool:
        """MAE's `mixup_active`: any of --mixup, --cutmix, --cutmix_minmax given."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    @property
    def cutmix_alpha(self) -> float:
        return 1.0 if self.cutmix_minmax is not None else self.cutmix  # timm forces 1 with minmax


class MixParams(NamedTuple):
    """Per-image mixing parameters, all [B]: what a step's mix did, for logging and tests."""

    lam: jax.Array  # float32 weight of the image's own label (after the box correction)
    blend: jax.Array  # bool: Mixup (a pixel blend) rather than a CutMix box or nothing
    box: jax.Array  # int32 [B, 4] (top, bottom, left, right) of the pasted box; empty if none


def rand_bbox(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int) -> jax.Array:
    """timm's `rand_bbox` given its centre draws: int32 [..., 4] (top, bottom, left, right).

    Sides `int(H * sqrt(1 - lam))`, `int(W * sqrt(1 - lam))` around (cy, cx), clipped to the image.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    return jnp.stack([top, bottom, left, right], axis=-1)


def _draw_box(key: jax.Array, lam: jax.Array, config: MixupConfig, height: int, width: int) -> jax.Array:
    """A CutMix box per lambda: `rand_bbox`, or `rand_bbox_minmax` (side fractions uniform in minmax)."""
    n = lam.shape[0]
    keys = jax.random.split(key, 4)
    if config.cutmix_minmax is None:
        cy = jax.random.randint(keys[0], (n,), 0, height)
        cx = jax.random.randint(keys[1], (n,), 0, width)
        return rand_bbox(lam, cy, cx, height, width)
    low, high = config.cutmix_minmax
    cut_h = jax.random.randint(keys[0], (n,), int(height * low), int(height * high))
    cut_w = jax.random.randint(keys[1], (n,), int(width * low), int(width * high))
    top = jax.random.randint(keys[2], (n,), 0, height - cut_h + 1)
    left = jax.random.randint(keys[3], (n,), 0, width - cut_w + 1)
    return jnp.stack([top, top + cut_h, left, left + cut_w], axis=-1)


def _symmetric_betas(key: jax.Array, alphas: tuple[float, ...], n: int) -> jax.Array:
    """[len(alphas), n] draws of Beta(a, a) = G_1 / (G_1 + G_2), G_i ~ Gamma(a), all from one gamma sampler.

    One sampler (a rejection loop) compiles in a fraction of the time of one `jax.random.beta` per alpha.
    """
    shape = jnp.repeat(jnp.asarray(alphas, jnp.float32), 2)
    log_gammas = jax.random.loggamma(key, jnp.broadcast_to(shape, (n, shape.size)))
    return jax.nn.softmax(log_gammas.reshape(n, len(alphas), 2), axis=-1)[..., 0].T


def _draw(key: jax.Array, config: MixupConfig, n: int, height: int, width: int) -> MixParams:
    """n independent draws of timm's `_params_per_elem` / `_params_per_batch`, with their boxes."""
    k_prob, k_switch, k_beta, k_box = jax.random.split(key, 4)
    cutmix_alpha = config.cutmix_alpha
    # a disabled method's alpha (0) stands in as 1: its draws are never selected
    cut_lam, mix_lam = _symmetric_betas(k_beta, (cutmix_alpha or 1.0, config.mixup or 1.0), n)
    if config.mixup > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch, (n,)) < config.mixup_switch_prob
    else:
        use_cutmix = jnp.full((n,), cutmix_alpha > 0)
    lam = jnp.where(use_cutmix, cut_lam, mix_lam)
    lam = jnp.where(jax.random.uniform(k_prob, (n,)) < config.mixup_prob, lam, 1.0).astype(jnp.float32)
    cut = use_cutmix & (lam != 1.0)  # timm leaves any image whose lambda is exactly 1 alone
    box = jnp.where(cut[:, None], _draw_box(k_box, lam, config, height, width), 0)
    if config.correct_lam or config.cutmix_minmax is not None:
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        lam = jnp.where(cut, 1.0 - area / (height * width), lam).astype(jnp.float32)
    return MixParams(lam, ~use_cutmix & (lam != 1.0), box)


def sample_mix_params(key: jax.Array, config: MixupConfig, batch_size: int, height: int, width: int) -> MixParams:
    """The step's mixing parameters for a batch of `batch_size` images of `height` x `width`."""
    if not config.enabled:
        raise ValueError("mixing is off: set --mixup, --cutmix or --cutmix_minmax")
    if batch_size % 2:
        raise ValueError(f"mixup needs an even batch size, got {batch_size}")
    if config.mixup_mode == "batch":
        return jax.tree.map(lambda p: jnp.repeat(p, batch_size, axis=0), _draw(key, config, 1, height, width))
    if config.mixup_mode == "pair":
        half = _draw(key, config, batch_size // 2, height, width)
        return jax.tree.map(lambda p: jnp.concatenate([p, p[::-1]]), half)
    return _draw(key, config, batch_size, height, width)


def mix_images(images: jax.Array, params: MixParams) -> jax.Array:
    """Each NHWC image mixed with its mirror in the batch (`images[::-1]`) by `params`."""
    flipped = images[::-1]
    lam = params.lam[:, None, None, None].astype(images.dtype)
    rows = jnp.arange(images.shape[1])[None, :, None, None]
    cols = jnp.arange(images.shape[2])[None, None, :, None]
    top, bottom, left, right = (params.box[:, i, None, None, None] for i in range(4))
    in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    pasted = jnp.where(in_box, flipped, images)
    return jnp.where(params.blend[:, None, None, None], images * lam + flipped * (1.0 - lam), pasted)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.1) -> jax.Array:
    """timm's smoothed one-hot: `1 - smoothing + smoothing / C` on the label, `smoothing / C` elsewhere."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jnp.where(labels[:, None] == jnp.arange(num_classes), on, off).astype(jnp.float32)


def mixup_target(labels: jax.Array, num_classes: int, lam: jax.Array, smoothing: float = 0.1) -> jax.Array:
    """timm's `mixup_target`: `lam * y + (1 - lam) * y.flip(0)`, y smoothed one-hot; `lam` scalar or [B]."""
    y = smooth_one_hot(labels, num_classes, smoothing)
    lam = jnp.reshape(jnp.asarray(lam, jnp.float32), (-1, 1))
    return y * lam + y[::-1] * (1.0 - lam)


def mixup(key: jax.Array, images: jax.Array, labels: jax.Array, config: MixupConfig) -> tuple[jax.Array, jax.Array]:
    """The fine-tuning step's input: (mixed NHWC images, soft targets [B, C]), drawn from `key`.

    With mixing off the images pass unchanged and the targets are the smoothed one-hot
    labels, so that `soft_target_cross_entropy` on them is MAE's `LabelSmoothingCrossEntropy`.
    """
    if not config.enabled:
        return images, smooth_one_hot(labels, config.nb_classes, config.smoothing)
    params = sample_mix_params(key, config, images.shape[0], images.shape[1], images.shape[2])
    return mix_images(images, params), mixup_target(labels, config.nb_classes, params.lam, config.smoothing)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm's `SoftTargetCrossEntropy`: mean over the batch of -sum(targets * log_softmax(logits))."""
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def label_smoothing_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.1) -> jax.Array:
    """timm's `LabelSmoothingCrossEntropy`: (1 - s) * NLL + s * mean over classes of -log p, batch mean."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return jnp.mean((1.0 - smoothing) * nll + smoothing * -jnp.mean(log_probs, axis=-1))
