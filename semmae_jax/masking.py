"""Which patches MAE removes: MAE's random masking and SemMAE's semantic-guided masking.

SemMAE (Li et al., NeurIPS 2022, arXiv 2206.10207) changes only *which* patches are
masked. Rather than a second masking code path in the model, both strategies are
expressed as the `noise` that `MaskedAutoencoderViT` already argsorts (small = kept,
the `L - int(L * (1 - r))` largest are removed), so the model, its parity tests and
its sharding stay those of MAE, and the choice runs inside the jitted train step.

Semantic masking, per sample, with part sizes n_k, budget B = L * r and a blend
weight alpha (0 = intra-part, 1 = inter-part):

* intra-part count m1_k = round(r * n_k): every part loses about r of its patches;
* inter-part count m2_k = min(n_k, max(0, floor(B - sizes of the parts before k))) for a
  random order of the parts: whole parts vanish while the budget lasts;
* c_k = round((1 - alpha) * m1_k + alpha * m2_k) patches of part k, a uniform random
  subset, are flagged;
* flagged patches are removed first, then unflagged labelled ones, unlabelled ones
  last, in random order inside each tier, so the number removed is always MAE's
  whatever the rounding did to sum(c_k).

Rounding is `jnp.round` (half to even), as the original's `torch.round`.
"""

from __future__ import annotations

import enum
import math

import jax
import jax.numpy as jnp

# Tiers of the masking order: a higher tier is removed first.
_UNLABELLED_TIER, _KEPT_TIER, _FLAGGED_TIER = 0, 1, 2


class MaskingSetting(enum.IntEnum):
    """The original's `--setting`, as this project reads it (only setting 3 was released)."""

    RANDOM = 0  # MAE's uniform masking; part maps unused
    INTRA_PART = 1  # alpha fixed at 0
    INTER_PART = 2  # alpha fixed at 1
    ADAPTIVE = 3  # alpha = (t / T) ** gamma: intra-part early, inter-part late


def random_noise(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """MAE's masking noise: uniform [0, 1), an independent shuffle per sample."""
    return jax.random.uniform(key, (batch, num_patches), jnp.float32)


def part_mask_counts(
    counts: jax.Array, order: jax.Array, *, num_patches: int, mask_ratio: float, alpha: float | jax.Array
) -> jax.Array:
    """How many patches of each part semantic masking flags (c_k above), on the last axis.

    Args:
      counts: int [..., K] part sizes n_k (0 for an empty part).
      order: int [..., K] a permutation of the parts: `order[..., i]` is the i-th part
        the inter-part walk visits.
      num_patches: L, all patches of the sample including unlabelled ones (the budget
        B = L * r counts them too).
      mask_ratio: r.
      alpha: blend weight in [0, 1]; may be traced.

    Returns:
      int32 [..., K] counts c_k, with c_k <= n_k.
    """
    counts = jnp.asarray(counts, jnp.int32)
    intra = jnp.round(mask_ratio * counts)
    walked = jnp.take_along_axis(counts, order, axis=-1)
    earlier = jnp.cumsum(walked, axis=-1) - walked
    # floor(B - earlier) == floor(B) - earlier as `earlier` is an integer; flooring B in
    # Python keeps L * r in float64 as the original does.
    inter_walked = jnp.clip(math.floor(num_patches * mask_ratio) - earlier, 0, walked)
    inter = jnp.take_along_axis(inter_walked, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.round((1 - alpha) * intra + alpha * inter).astype(jnp.int32)


def semantic_noise(
    key: jax.Array, part_labels: jax.Array, *, mask_ratio: float, alpha: float | jax.Array, num_parts: int = 8
) -> jax.Array:
    """Noise whose argsort masking (`semmae_jax.models.random_masking`) is SemMAE's.

    The noise is each patch's place in the masking order divided by L: distinct values,
    so the argsort has no ties to resolve and the tiers are respected exactly.

    Args:
      key: PRNG key; the part order, the flagged subsets and the tie order all derive
        from it, independently for each sample.
      part_labels: int [N, L], the part of each patch in 0..num_parts-1, -1 for none.
        Labels are not range-checked (they may be traced); values >= num_parts are
        a caller bug.
      mask_ratio: r, static.
      alpha: 0 = intra-part, 1 = inter-part; may be traced, so a schedule that changes it
        every step does not recompile.
      num_parts: K, a static bound on the number of parts; empty parts are harmless.

    Returns:
      float32 [N, L] noise in [0, 1); the largest `L - int(L * (1 - r))` are removed.
    """
    if part_labels.ndim != 2 or not jnp.issubdtype(part_labels.dtype, jnp.integer):
        raise ValueError(
            f"part_labels must be integer [batch, num_patches], got {part_labels.dtype}{part_labels.shape}"
        )
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    batch, length = part_labels.shape
    labels = part_labels.astype(jnp.int32)
    order_key, subset_key, tie_key = jax.random.split(key, 3)
    counts = jax.nn.one_hot(labels, num_parts, dtype=jnp.int32).sum(axis=1)
    order = jnp.argsort(jax.random.uniform(order_key, (batch, num_parts)), axis=1)
    quota = part_mask_counts(counts, order, num_patches=length, mask_ratio=mask_ratio, alpha=alpha)
    subset_u = jax.random.uniform(subset_key, (batch, length))
    tie_u = jax.random.uniform(tie_key, (batch, length))
    return jax.vmap(_masking_order_noise)(labels, counts, quota, subset_u, tie_u)


def _masking_order_noise(
    labels: jax.Array, counts: jax.Array, quota: jax.Array, subset_u: jax.Array, tie_u: jax.Array
) -> jax.Array:
    """One sample, O(L log L): two sorts and a scatter, no [L, L] comparison matrix."""
    length = labels.shape[0]
    place = jnp.arange(length, dtype=jnp.int32)
    # Sorting by (part, uniform) lays each part out as one run in random order, so the
    # first quota_k patches of part k's run are a uniform random subset of the part.
    sorted_labels, _, patch = jax.lax.sort((labels, subset_u, place), num_keys=2)
    part = jnp.maximum(sorted_labels, 0)
    run_start = (length - counts.sum()) + jnp.cumsum(counts) - counts  # unlabelled (-1) run first
    flagged = place - run_start[part] < quota[part]
    tier = jnp.where(sorted_labels < 0, _UNLABELLED_TIER, jnp.where(flagged, _FLAGGED_TIER, _KEPT_TIER))
    # tie_u is i.i.d., so pairing it with sorted positions still shuffles each tier uniformly.
    _, _, patch = jax.lax.sort((tier, tie_u, patch), num_keys=2)
    return jnp.zeros(length, jnp.float32).at[patch].set(place / length)


def alpha_schedule(progress: float, gamma: float = 2.0) -> float:
    """SemMAE's adaptive blend weight: alpha = progress ** gamma, intra- to inter-part.

    `progress` is the fractional epoch over the run's total epochs, computed every step,
    so alpha rises smoothly. The original stepped it once an epoch with t = epoch + 1
    over T = 800 hard-coded whatever `--epochs` said; here T is the run's own length.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return float(progress) ** gamma


def masking_alpha(setting: MaskingSetting | int, progress: float, gamma: float = 2.0) -> float:
    """Alpha for this step under `setting` (unused by RANDOM, reported as 0)."""
    setting = MaskingSetting(setting)
    if setting is MaskingSetting.ADAPTIVE:
        return alpha_schedule(progress, gamma)
    return 1.0 if setting is MaskingSetting.INTER_PART else 0.0


def masking_noise(
    key: jax.Array,
    part_labels: jax.Array,
    *,
    setting: MaskingSetting | int,
    mask_ratio: float,
    alpha: float | jax.Array,
    num_parts: int = 8,
) -> jax.Array:
    """The train step's one call: the noise for `setting` (static), alpha from `masking_alpha`.

    RANDOM ignores the part labels except for their shape, so a random-masking run
    feeds the same batch structure as a semantic one.
    """
    if MaskingSetting(setting) is MaskingSetting.RANDOM:
        return random_noise(key, *part_labels.shape)
    return semantic_noise(key, part_labels, mask_ratio=mask_ratio, alpha=alpha, num_parts=num_parts)


def labelled_positions(part_labels: jax.Array, count: int) -> jax.Array:
    """int32 [N, count] grid indices: each sample's first `count` part-labelled positions, in grid order
    (then its unlabelled ones, in order, where it has fewer). The original's ViT-B/8 saw only its
    records' 196 of the 784 positions, exactly the labelled ones of their imported maps."""
    return jnp.argsort((part_labels < 0).astype(jnp.int32), axis=1, stable=True)[:, :count].astype(jnp.int32)


def tokens_and_noise(
    key: jax.Array,
    part_labels: jax.Array,
    *,
    labelled_tokens: int,
    setting: MaskingSetting | int,
    mask_ratio: float,
    alpha: float | jax.Array,
    num_parts: int = 8,
) -> tuple[jax.Array, jax.Array | None]:
    """(noise, positions) of a pretraining batch: with `labelled_tokens` K > 0 the model sees K
    positions of each image (`labelled_positions`) and the noise is drawn over theirs alone (their
    parts, their sizes); with 0, every patch (positions None) and `masking_noise` over the grid."""
    positions = labelled_positions(part_labels, labelled_tokens) if labelled_tokens else None
    labels = part_labels if positions is None else jnp.take_along_axis(part_labels, positions, axis=1)
    noise = masking_noise(key, labels, setting=setting, mask_ratio=mask_ratio, alpha=alpha, num_parts=num_parts)
    return noise, positions
