"""The part learner's losses, each a plain function of `PartOutputs` and the images.

* pixels: mean squared error of the decoder's image against the input (resized, with
  antialiasing, to the decoder's resolution); the paper's reconstruction loss.
* features (optional): the backbone's patch tokens of the reconstruction against those
  of the input, a perceptual loss with the frozen backbone itself as the network (no
  downloaded VGG).
* tokens (ours): the patch tokens rebuilt from the blurred maps against the real ones,
  as a fraction of the tokens' within-image variance. The pixel loss alone is ruled by
  the largest areas (on the demo, 93 % of the patches are background, whose colours
  vary more inside an image than the animal's parts differ), so it splits the
  background; tokens are where a self-supervised backbone separates the parts.
* diversity: the overlap of the maps, sum_k M_k(x) * sum_{j != k} M_j(x) averaged over
  patches (for maps summing to 1, the Gini impurity 1 - sum_k M_k(x)^2): 0 when one map
  holds each patch. It is the pairwise form of MA-CNN's channel-grouping "Div" (Zheng et
  al., ICCV 2017), which takes max_{j != k} instead of the sum: on softmax maps that
  max form is not monotone (uniform maps 0.25, halfway to one-hot 0.31 for 4 parts),
  so near the uniform start it would hold the maps together instead of apart.
* foreground area (with a background part): the mean mass of the N part maps. A patch
  joins a part only where that lowers the token loss by more than the weight, so the
  background takes what the parts do not explain (a sparsity prior, as saliency is in
  SCOPS).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from semmae_jax.parts.learner import PartOutputs


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the terms (0 turns a term off)."""

    pixels: float = 1.0
    features: float = 0.0
    tokens: float = 1.0
    diversity: float = 1.0
    foreground: float = 0.0


def pixel_loss(image_recon: jax.Array, images: jax.Array) -> jax.Array:
    """MSE against the images resized (antialiased) to the reconstruction's size."""
    target = jax.image.resize(images, (*images.shape[:1], *image_recon.shape[1:3], images.shape[-1]), "linear")
    return jnp.mean(jnp.square(image_recon - target))


def feature_loss(recon_tokens: jax.Array, patches: jax.Array) -> jax.Array:
    """Squared error of the tokens, as a fraction of the tokens' squared norm (scale free)."""
    return jnp.sum(jnp.square(recon_tokens - patches)) / jnp.sum(jnp.square(patches))


def token_reconstruction_loss(patches: jax.Array, token_recon: jax.Array) -> jax.Array:
    """Unexplained fraction of the within-image token variance, over the batch.

    The denominator (each token's squared distance to its image's mean token) makes the
    loss comparable across backbones; it is summed over the batch before dividing, so
    that images with a plain background do not weigh more than the others.
    """
    residual = jnp.sum(jnp.square(patches - token_recon))
    spread = jnp.sum(jnp.square(patches - patches.mean(axis=1, keepdims=True)))
    return residual / spread


def diversity_loss(maps: jax.Array) -> jax.Array:
    """Overlap of [B, P, ...] maps: sum_k M_k * sum_{j != k} M_j, averaged over positions."""
    total = maps.sum(axis=1, keepdims=True)
    return jnp.mean(jnp.sum(maps * (total - maps), axis=1))


def foreground_area(maps: jax.Array) -> jax.Array:
    """Mean mass of the part maps other than the background (the last)."""
    return jnp.mean(jnp.sum(maps[:, :-1], axis=1))


def part_losses(
    outputs: PartOutputs, images: jax.Array, weights: LossWeights, background: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted total, every term) for one batch; terms with weight 0 are not computed."""
    terms = {
        "pixels": lambda: pixel_loss(outputs.image_recon, images),
        "features": lambda: feature_loss(outputs.recon_tokens, outputs.patches),
        "tokens": lambda: token_reconstruction_loss(outputs.patches, outputs.token_recon),
        "diversity": lambda: diversity_loss(outputs.blurred),
        "foreground": lambda: foreground_area(outputs.blurred),
    }
    metrics = {name: term() for name, term in terms.items() if getattr(weights, name) and (name != "foreground" or background)}
    total = sum(getattr(weights, name) * value for name, value in metrics.items())
    return total, {"loss": total, **metrics}
