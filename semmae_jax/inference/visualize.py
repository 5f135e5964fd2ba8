"""Pictures of what the models see and make: image | part map | mask | reconstruction, and learned parts.

Pure numpy + PIL, so it runs anywhere the logs are written.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
from PIL import Image

from semmae_jax.data.imagenet import IMAGENET_MEAN_F32, IMAGENET_STD_F32
from semmae_jax.models.mae import patchify, unpatchify

# Distinct colours for part ids 0..; "no part" is drawn black.
PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
     (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)],
    np.uint8,
)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Normalised [..., H, W, C] float -> uint8 RGB pixels.

    Three bands are ImageNet-normalised RGB: their pixels back. Other counts (`data.bands`, each
    band normalised by its own mean and std) show bands 1-3 as red, green and blue, or band 1 in
    grey with fewer than 3, stretched over mean +- 2 std.
    """
    if images.shape[-1] == 3:
        return np.clip((images * IMAGENET_STD_F32 + IMAGENET_MEAN_F32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    shown = images[..., :3] if images.shape[-1] > 3 else np.repeat(images[..., :1], 3, axis=-1)
    return np.clip((shown + 2.0) * (255.0 / 4.0) + 0.5, 0, 255).astype(np.uint8)


def part_colours(labels: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Per-patch part ids [L] -> an RGB picture of the patch grid at `size` (H, W)."""
    rgb = np.where(labels[:, None] >= 0, PALETTE[np.maximum(labels, 0) % len(PALETTE)], 0).astype(np.uint8)
    image = Image.fromarray(rgb.reshape(*grid, 3))
    return np.asarray(image.resize(size[::-1], Image.NEAREST))


def reconstruction(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, patch_size: int, norm_pix_loss: bool) -> np.ndarray:
    """Predicted pixels in image space, the visible patches pasted back (as MAE's demo).

    With `norm_pix_loss` the prediction is per-patch standardised, so it is mapped back
    with each target patch's own mean and (unbiased) std.
    """
    target = np.asarray(patchify(images, patch_size))
    pred = np.asarray(pred, np.float32)
    if norm_pix_loss:
        mean = target.mean(-1, keepdims=True)
        std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
        pred = pred * std + mean
    mixed = np.where(mask[..., None] > 0, pred, target)
    return np.asarray(unpatchify(mixed, patch_size, grid=(images.shape[1] // patch_size, images.shape[2] // patch_size),
                                  channels=images.shape[-1]))


def masked_view(images: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """The input with the removed patches greyed out."""
    patches = np.asarray(patchify(images, patch_size))
    grey = np.zeros_like(patches)  # zero in normalised space = the dataset mean colour
    grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
    return np.asarray(unpatchify(np.where(mask[..., None] > 0, grey, patches), patch_size, grid=grid,
                                 channels=images.shape[-1]))


def panel_row(cells: list[np.ndarray], min_size: int) -> np.ndarray:
    """uint8 HWC cells side by side with white borders, enlarged (nearest, whole factors) to at least
    `min_size` pixels a side so that patches stay visible."""
    factor = max(1, -(-min_size // cells[0].shape[0]))
    cells = [np.repeat(np.repeat(c, factor, axis=0), factor, axis=1) for c in cells]
    return np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], axis=1)


def pretrain_panel(
    images: np.ndarray, part_labels: np.ndarray, mask: np.ndarray, pred: np.ndarray, patch_size: int,
    norm_pix_loss: bool, min_cell: int = 160,
) -> np.ndarray:
    """One row per image: input | part map | masked input | reconstruction (uint8 HWC)."""
    n, h, w, _ = images.shape
    grid = (h // patch_size, w // patch_size)
    rows = []
    for i in range(n):
        cells = [
            to_uint8(images[i]),
            part_colours(np.asarray(part_labels[i]), grid, (h, w)),
            to_uint8(masked_view(images[i : i + 1], mask[i : i + 1], patch_size)[0]),
            to_uint8(reconstruction(images[i : i + 1], pred[i : i + 1], mask[i : i + 1], patch_size, norm_pix_loss)[0]),
        ]
        rows.append(panel_row(cells, min_cell))
    return np.concatenate(rows, axis=0)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 image [H, W, 3] with per-patch part ids [L] painted over it (-1: left as is)."""
    height, width = image.shape[:2]
    patch = round(math.sqrt(height * width / labels.size))  # square patches: (H/p) * (W/p) = L
    grid = (height // patch, width // patch)
    colours = part_colours(labels, grid, (height, width)).astype(np.float32)
    painted = np.repeat(np.repeat(labels.reshape(grid) >= 0, patch, 0), patch, 1)
    blend = np.where(painted[..., None], (1 - alpha) * image + alpha * colours, image)
    return blend.astype(np.uint8)


def parts_panel(images: np.ndarray, label_sets: list[np.ndarray], min_size: int = 128) -> np.ndarray:
    """One row per image: the image, then each set of per-patch labels [N, L] overlaid on it."""
    rows = [panel_row([image] + [overlay(image, labels[i]) for labels in label_sets], min_size)
            for i, image in enumerate(to_uint8(images))]
    return np.concatenate(rows, axis=0)


def masked_parts(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 image [H, W, 3] with its parts painted over it and the removed patches (`mask` [L], 1 =
    removed) filled with the dataset's mean colour: which parts a mask takes away."""
    painted = overlay(image, labels)
    grid = (image.shape[0] // patch_size, image.shape[1] // patch_size)
    removed = np.repeat(np.repeat(mask.reshape(grid) > 0, patch_size, 0), patch_size, 1)
    return np.where(removed[..., None], to_uint8(np.zeros(3, np.float32)), painted)  # the mean colour


TEXT_BAND = 14  # pixels of the title band above each row of `titled_rows`


def titled_rows(rows: list[tuple[list[str], list[np.ndarray]]], caption: list[str], min_size: int = 160) -> np.ndarray:
    """A figure: per row, a band of titles over its cells (same-size uint8 HWC, enlarged as `panel_row`),
    rows padded on the right to the widest; then the caption's lines. White background."""
    from PIL import ImageDraw

    strips = [panel_row(cells, min_size) for _, cells in rows]
    width = max(strip.shape[1] for strip in strips)
    caption = [part for line in caption for part in textwrap.wrap(line, max(20, width // 6))]  # ~6 px a character
    cell_height = strips[0].shape[0]  # every cell has the same size, + 2 pixels a side with borders
    cell_width = strips[0].shape[1] // len(rows[0][1])
    height = len(rows) * (TEXT_BAND + cell_height) + len(caption) * TEXT_BAND
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for (titles, _), strip in zip(rows, strips, strict=True):
        for k, title in enumerate(titles):
            draw.text((k * cell_width + 3, top + 1), title, fill="black")
        canvas.paste(Image.fromarray(strip), (0, top + TEXT_BAND))
        top += TEXT_BAND + cell_height
    for line in caption:
        draw.text((3, top + 1), line, fill="black")
        top += TEXT_BAND
    return np.asarray(canvas)
