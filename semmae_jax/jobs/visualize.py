"""`python main.py visualize`: what a pretrained MAE / SemMAE reconstructs, and how SemMAE masks.

    python main.py visualize --checkpoint CKPT IMAGE... [--part_map PNG...] [--mask_ratio R]
                             [--setting S] [--alpha A ...] [--seed N] --out FIG.png

Per image, MAE's figure (its visualisation notebook): original | masked | reconstruction |
reconstruction with the visible patches pasted back. With part maps (one per image, each
the size of its image), a second row: the map and the masks SemMAE draws at each `--alpha`
(setting 3; settings 1 and 2 fix alpha at 0 and 1, setting 0 is MAE's random mask), all
from one key so that the alphas differ only in how the budget is spread over the parts;
the reconstruction uses the first of these masks (MAE's random mask without part maps).
Images of any size are resized and centre-cropped as evaluation does (`EvalTransform`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from semmae_jax import config as config_lib
from semmae_jax import masking
from semmae_jax.checkpoint import WeightsReader
from semmae_jax.data.bands import Bands, data_bands
from semmae_jax.image_size import ImageSize, image_size, size_text
from semmae_jax.inference import visualize
from semmae_jax.runtime.storage import save_png


class Views(NamedTuple):
    """What the figure shows, as arrays (normalised images, per-patch masks with 1 = removed)."""

    images: np.ndarray  # float32 [N, S, S, 3]
    pred: np.ndarray  # float32 [N, L, p*p*3]: the decoder's output
    mask: np.ndarray  # float32 [N, L]: the reconstruction's mask
    part_labels: np.ndarray | None  # int32 [N, L] (None without part maps)
    alpha_masks: list[np.ndarray]  # float32 [N, L] per alpha (with part maps)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size, any format PIL reads)")
    parser.add_argument("--checkpoint", required=True, help="an MAE / SemMAE pretraining checkpoint: an orbax run "
                                                            "(or its checkpoints/), a .pth, a transformers directory")
    parser.add_argument("--part_map", nargs="+", metavar="PNG", help="a part map per image, in the images' order")
    parser.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches removed")
    parser.add_argument("--setting", type=int, default=3, choices=(0, 1, 2, 3),
                        help="masking: 0 random, 1 intra-part, 2 inter-part, 3 adaptive (the alphas of --alpha)")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                        help="setting 3: the alphas whose masks are drawn (0 intra-part .. 1 inter-part)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the masks")
    parser.add_argument("--input_size", type=int, nargs="+", metavar="SIDE",
                        help="image size: one side or HEIGHT WIDTH (default: the checkpoint's)")
    parser.add_argument("--mean", type=float, nargs="+", help="per-band mean of images that are not 8-bit RGB "
                        "(the files' units; docs/data.md, Bands)")
    parser.add_argument("--std", type=float, nargs="+", help="per-band std, as --mean")
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help="the model predicts per-patch normalised pixels (default: what the checkpoint states)")
    parser.add_argument("--out", required=True, help="the figure to write (PNG)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if any(not 0.0 <= a <= 1.0 for a in args.alpha):
        parser.error(f"--alpha values must be in [0, 1], got {args.alpha}")
    if args.part_map and len(args.part_map) != len(args.images):
        parser.error(f"{len(args.part_map)} part maps for {len(args.images)} images: give one --part_map per image")
    return args


def check_inputs(images: Sequence[str], part_maps: Sequence[str] | None) -> None:
    """Every image readable, every part map readable and of its image's size: else one line naming the file."""
    from semmae_jax.data.part_maps import read_part_map

    sizes = []
    for path in images:
        try:
            with Image.open(path) as image:
                image.load()
                sizes.append(image.size)
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{path} is not a readable image ({error}); give a JPEG, PNG, ... file") from None
    for path, image, (width, height) in zip(part_maps or (), images, sizes, strict=False):
        shape = read_part_map(path).shape
        if shape != (height, width):
            raise ValueError(f"part map {path} is {shape[1]}x{shape[0]}, its image {image} {width}x{height}: give "
                             "the map made for this image, at its size")


def load_model(reader: WeightsReader, checkpoint: str, input_size: ImageSize | None,
               norm_pix_loss: bool | None) -> tuple[Any, Any]:
    """(MAE model, params) of `checkpoint`; a checkpoint without a decoder is refused."""
    from semmae_jax.models import create_model, model_family

    params, name, overrides = reader.whole_model(checkpoint, input_size)
    if model_family(name) != "mae":
        raise ValueError(f"{checkpoint} holds {name}, a model without a decoder: visualize needs a pretraining "
                         "checkpoint (an MAE / SemMAE run, its .pth, or a ViTMAEForPreTraining directory)")
    stated = overrides.pop("norm_pix_loss", None)
    if stated is None and Path(checkpoint).is_dir():
        stated = _saved_config(checkpoint).get("norm_pix_loss")
    return create_model(name, **overrides, norm_pix_loss=bool(stated if norm_pix_loss is None else norm_pix_loss)), params


def _saved_config(path: str) -> dict[str, Any]:
    """The flags a pretraining run saved with its checkpoint ({} for a converted release)."""
    from semmae_jax.checkpoint.manager import open_step

    return open_step(path).json_item("config") or {}


def load_images(images: Sequence[str], part_maps: Sequence[str] | None, img_size: ImageSize,
                patch_size: int, bands: Bands | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(normalised images [N, H, W, C], per-patch part labels [N, L], -1 without a map), as evaluation crops;
    8-bit RGB, or `bands` (`data.bands`)."""
    from semmae_jax.data.sources import needs_pil
    from semmae_jax.data.tf_runtime import tf
    from semmae_jax.data.transforms import EvalTransform, normalize, part_map_problem

    transform = EvalTransform(img_size, patch_size=patch_size, bands=bands)
    pixels, labels = [], []
    for k, path in enumerate(images):
        part = Path(part_maps[k]).read_bytes() if part_maps else b""
        raw = {"image": tf.constant(Path(path).read_bytes()), "part": tf.constant(part),
               "pil": needs_pil(tf.constant(path))}
        out = transform(raw, tf.zeros([2], tf.int64))
        problem = part_map_problem(out["part_labels"].numpy(), None)
        if problem:
            raise ValueError(f"part map {part_maps[k]} {problem}")
        pixels.append((out["image"] if bands else normalize(out["image"])).numpy())
        labels.append(out["part_labels"].numpy())
    return np.stack(pixels), np.stack(labels)


def masks_to_draw(setting: int, alphas: Sequence[float]) -> list[float]:
    """The alphas whose masks the figure shows: `alphas` for setting 3, the fixed one otherwise."""
    return list(alphas) if setting == masking.MaskingSetting.ADAPTIVE else [masking.masking_alpha(setting, 0.0)]


def views(model: Any, params: Any, images: np.ndarray, part_labels: np.ndarray | None, *, mask_ratio: float,
          setting: int, alphas: Sequence[float], seed: int) -> Views:
    """The model's reconstruction and the masks at each alpha, all from one key (`seed`)."""
    import jax
    import jax.numpy as jnp

    from semmae_jax.models import random_masking

    key = jax.random.key(seed)
    n, length = len(images), model.num_patches
    noises = [] if part_labels is None else [
        masking.masking_noise(key, jnp.asarray(part_labels), setting=setting, mask_ratio=mask_ratio, alpha=alpha,
                              num_parts=int(max(part_labels.max(), 0)) + 1)
        for alpha in masks_to_draw(setting, alphas)]
    alpha_masks = [np.asarray(random_masking(jnp.zeros((n, length, 1)), mask_ratio, z)[1]) for z in noises]
    noise = noises[0] if noises else masking.random_noise(key, n, length)
    apply = jax.jit(lambda p, x, z: model.apply({"params": p}, x, mask_ratio, z)[1:])
    pred, mask = (np.asarray(a) for a in apply(params, jnp.asarray(images), noise))
    return Views(images, pred, mask, part_labels, alpha_masks)


def figure(v: Views, patch_size: int, norm_pix_loss: bool, alphas: Sequence[float], setting: int) -> np.ndarray:
    """Per image, MAE's row and (with part maps) the map and the masks at each alpha; a caption."""
    length = v.mask.shape[1]
    removed = int(v.mask[0].sum())
    pasted = visualize.reconstruction(v.images, v.pred, v.mask, patch_size, norm_pix_loss)
    whole = visualize.reconstruction(v.images, v.pred, np.ones_like(v.mask), patch_size, norm_pix_loss)
    masked = visualize.masked_view(v.images, v.mask, patch_size)
    originals = visualize.to_uint8(v.images)
    shown = masks_to_draw(setting, alphas)
    rows = []
    for i, original in enumerate(originals):
        rows.append((["original", f"masked ({removed}/{length})", "reconstruction", "+ visible patches"],
                     [original, *visualize.to_uint8(np.stack([masked[i], whole[i], pasted[i]]))]))
        if v.part_labels is not None:
            grid = (original.shape[0] // patch_size, original.shape[1] // patch_size)
            cells = [visualize.part_colours(v.part_labels[i], grid, original.shape[:2])]
            cells += [visualize.masked_parts(original, v.part_labels[i], m[i], patch_size) for m in v.alpha_masks]
            rows.append((["part map", *(f"mask, alpha {a:g}" for a in shown)], cells))
    strategy = "MAE's random mask" if v.part_labels is None or setting == 0 else (
        f"SemMAE's mask (setting {setting}, alpha {shown[0]:g})")
    caption = [f"Reconstruction under {strategy}, seed-fixed; grey: removed patches."]
    if norm_pix_loss:
        caption.append("norm_pix_loss model: its prediction is mapped back with each target patch's own mean and "
                       "variance, which come from the image, not the model (as MAE's demo does).")
    return visualize.titled_rows(rows, caption)


def draw(args: argparse.Namespace, reader: WeightsReader) -> Views:
    check_inputs(args.images, args.part_map)
    size = None if args.input_size is None else image_size(args.input_size)
    model, params = load_model(reader, args.checkpoint, size, args.norm_pix_loss)
    bands = data_bands(None, model.in_chans, args.mean, args.std)
    images, labels = load_images(args.images, args.part_map, model.img_size, model.patch_size, bands)
    v = views(model, params, images, labels if args.part_map else None, mask_ratio=args.mask_ratio,
              setting=args.setting, alphas=args.alpha, seed=args.seed)
    save_png(args.out, figure(v, model.patch_size, model.norm_pix_loss, args.alpha, args.setting))
    print(f"wrote {args.out}: {len(images)} image(s) at {size_text(model.img_size)}, {int(v.mask[0].sum())} of "
          f"{v.mask.shape[1]} patches removed" + (", norm_pix_loss" if model.norm_pix_loss else ""))
    return v


def main(argv: Sequence[str], reader: WeightsReader) -> None:
    """`python main.py visualize ...`."""
    config_lib.one_line_errors("main.py visualize", draw, parse(argv), reader)
