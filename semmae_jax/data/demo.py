"""Synthetic demo dataset: creatures made of recurring semantic parts, with exact part maps.

With no `--data_path`, the jobs train on this instead of ImageNet. It is written once
to a cache folder in the real layout, so the demo runs the real pipeline:

    ROOT/train/<class>/<class>_0000.jpg ...    (128 per class by default)
    ROOT/val/<class>/...                       (32 per class)
    ROOT/parts/{train,val}/<class>/<name>.png  ground-truth part maps (mirrored tree)
    ROOT/meta.json                             part names, classes, sizes

Each 96 x 96 image (the demo model crops 64) is a textured background and one
creature at a random position, scale, tilt and facing direction. A creature is a
union of ellipses, each belonging to a semantic part whose id means the same thing in
every image: 0 background, 1 head, 2 torso, 3 front legs, 4 hind legs, 5 tail. Each
part has its own colour family and texture, so parts are learnable without labels;
the four classes differ in body plan (proportions, leg length, tail) and torso
texture, so fine-tuning can beat chance. The part map is rendered with the image,
pixel for pixel.

`demo_data(num_images=N, classes=K)` (or `python -m semmae_jax.data.demo --num_images N
--classes K`) writes a harder variant in its own folder: up to 8 classes (four more body
plans) whose torso texture is random, so that only part shapes and proportions tell them apart.

Generation is deterministic (numpy seeded per image, PIL only) and takes a few
seconds. It runs in a temporary folder that is renamed into place at the end, so an
interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from semmae_jax.data.part_maps import write_part_map

VERSION = "demo-v1"
SHAPES_VERSION = "demo-shapes-v1"  # the harder variant (more images and classes)
IMAGE_SIZE = 96
PART_NAMES = ("background", "head", "torso", "front legs", "hind legs", "tail")
BACKGROUND, HEAD, TORSO, FRONT_LEGS, HIND_LEGS, TAIL = range(len(PART_NAMES))
# Hue of each part's colour family (background: any hue, low saturation).
PART_HUES = {HEAD: 0.0, TORSO: 0.6, FRONT_LEGS: 0.33, HIND_LEGS: 0.13, TAIL: 0.8}
DRAW_ORDER = (TAIL, HIND_LEGS, TORSO, FRONT_LEGS, HEAD)  # later parts occlude earlier ones


class Ellipse(NamedTuple):
    """In the creature's frame: torso at the origin, +x forward, +y down; degrees."""

    x: float
    y: float
    rx: float
    ry: float
    angle: float = 0.0


# Body plans: part -> ellipses. Class folders sort in this order (label ids 0..3).
BODY_PLANS: dict[str, dict[int, tuple[Ellipse, ...]]] = {
    "blob": {
        TORSO: (Ellipse(0, 0, 1.0, 0.85),),
        HEAD: (Ellipse(0.95, -0.55, 0.55, 0.5),),
        FRONT_LEGS: (Ellipse(0.5, 0.8, 0.16, 0.3), Ellipse(0.2, 0.85, 0.16, 0.3)),
        HIND_LEGS: (Ellipse(-0.5, 0.8, 0.16, 0.3), Ellipse(-0.2, 0.85, 0.16, 0.3)),
        TAIL: (Ellipse(-1.05, -0.2, 0.35, 0.14, -30),),
    },
    "hound": {
        TORSO: (Ellipse(0, 0, 1.2, 0.5),),
        HEAD: (Ellipse(1.35, -0.6, 0.42, 0.32, -20), Ellipse(1.0, -0.35, 0.3, 0.16, -40)),
        FRONT_LEGS: (Ellipse(0.8, 0.8, 0.11, 0.5), Ellipse(0.5, 0.85, 0.11, 0.5)),
        HIND_LEGS: (Ellipse(-0.8, 0.8, 0.11, 0.5), Ellipse(-0.5, 0.85, 0.11, 0.5)),
        TAIL: (Ellipse(-1.45, -0.45, 0.5, 0.1, -40),),
    },
    "lizard": {
        TORSO: (Ellipse(0, 0, 1.3, 0.35),),
        HEAD: (Ellipse(1.55, 0, 0.4, 0.26),),
        FRONT_LEGS: (Ellipse(0.75, 0.45, 0.32, 0.1, 40), Ellipse(0.75, -0.45, 0.32, 0.1, -40)),
        HIND_LEGS: (Ellipse(-0.75, 0.45, 0.32, 0.1, -40), Ellipse(-0.75, -0.45, 0.32, 0.1, 40)),
        TAIL: (Ellipse(-2.2, 0, 1.0, 0.12),),
    },
    "stork": {
        TORSO: (Ellipse(0, 0, 0.8, 0.5, -10),),
        HEAD: (Ellipse(0.9, -1.15, 0.32, 0.24), Ellipse(0.65, -0.6, 0.1, 0.45, 30)),
        FRONT_LEGS: (Ellipse(0.2, 1.05, 0.07, 0.65),),
        HIND_LEGS: (Ellipse(-0.2, 1.05, 0.07, 0.65),),
        TAIL: (Ellipse(-0.9, -0.2, 0.32, 0.15, -20),),
    },
}
TORSO_TEXTURE = {"blob": "spots", "hound": "stripes", "lizard": "checks", "stork": "smooth"}

# The harder variant's further classes (`demo_data(num_images=..., classes=...)`): same parts, same
# colours, other shapes and proportions; some are near neighbours of the first four on purpose
# (otter ~ lizard / hound, giraffe ~ hound / stork), so a class is told by its proportions alone.
MORE_BODY_PLANS: dict[str, dict[int, tuple[Ellipse, ...]]] = {
    "giraffe": {
        TORSO: (Ellipse(0, 0, 0.9, 0.45),),
        HEAD: (Ellipse(1.15, -1.9, 0.35, 0.2), Ellipse(0.85, -1.0, 0.14, 0.8, 15)),
        FRONT_LEGS: (Ellipse(0.6, 1.1, 0.09, 0.75), Ellipse(0.35, 1.15, 0.09, 0.75)),
        HIND_LEGS: (Ellipse(-0.6, 1.1, 0.09, 0.75), Ellipse(-0.35, 1.15, 0.09, 0.75)),
        TAIL: (Ellipse(-1.0, 0.1, 0.3, 0.07, 60),),
    },
    "beetle": {
        TORSO: (Ellipse(0, 0, 0.9, 0.7),),
        HEAD: (Ellipse(0.95, 0, 0.3, 0.35),),
        FRONT_LEGS: (Ellipse(0.4, 0.75, 0.3, 0.07, 60), Ellipse(0.4, -0.75, 0.3, 0.07, -60)),
        HIND_LEGS: (Ellipse(-0.4, 0.75, 0.3, 0.07, -60), Ellipse(-0.4, -0.75, 0.3, 0.07, 60)),
        TAIL: (Ellipse(-0.95, 0, 0.15, 0.1),),
    },
    "kangaroo": {
        TORSO: (Ellipse(0, 0, 0.6, 0.85, 20),),
        HEAD: (Ellipse(0.45, -1.05, 0.35, 0.25),),
        FRONT_LEGS: (Ellipse(0.5, 0.0, 0.25, 0.07, 30),),
        HIND_LEGS: (Ellipse(-0.1, 0.9, 0.55, 0.2, -10),),
        TAIL: (Ellipse(-1.0, 0.8, 0.8, 0.15, -20),),
    },
    "otter": {
        TORSO: (Ellipse(0, 0, 1.5, 0.4),),
        HEAD: (Ellipse(1.7, -0.15, 0.35, 0.3),),
        FRONT_LEGS: (Ellipse(0.9, 0.45, 0.1, 0.2),),
        HIND_LEGS: (Ellipse(-0.9, 0.45, 0.1, 0.2),),
        TAIL: (Ellipse(-2.0, 0.1, 0.7, 0.2, -10),),
    },
}
ALL_BODY_PLANS = {**BODY_PLANS, **MORE_BODY_PLANS}
TEXTURES = ("spots", "stripes", "checks", "smooth")  # the harder variant draws the torso's at random


# --------------------------------------------------------------------------- rendering


def _creature_frame(rng: np.random.Generator, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grid -> creature coordinates (u, v) for a random pose that keeps it mostly in view."""
    scale = rng.uniform(0.28, 0.42) * IMAGE_SIZE / extent  # pixels per creature unit
    margin = 0.6 * extent * scale
    cx, cy = (rng.uniform(min(margin, IMAGE_SIZE / 2), max(IMAGE_SIZE - margin, IMAGE_SIZE / 2)) for _ in range(2))
    tilt = np.deg2rad(rng.uniform(-25, 25))
    facing = rng.choice([-1.0, 1.0])
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5
    dx, dy = (x - cx) / scale, (y - cy) / scale
    u = np.cos(tilt) * dx + np.sin(tilt) * dy
    v = -np.sin(tilt) * dx + np.cos(tilt) * dy
    return facing * u, v


def _inside(u: np.ndarray, v: np.ndarray, e: Ellipse) -> np.ndarray:
    a = np.deg2rad(e.angle)
    du, dv = u - e.x, v - e.y
    pu = np.cos(a) * du + np.sin(a) * dv
    pv = -np.sin(a) * du + np.cos(a) * dv
    return (pu / e.rx) ** 2 + (pv / e.ry) ** 2 <= 1.0


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pattern in [-1, 1] that moves with the creature."""
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "spots":
        return np.sign(np.sin(7 * u + phase) * np.sin(7 * v + phase)) * (np.cos(7 * u) * np.cos(7 * v) > 0.3)
    if kind == "stripes":
        return np.sin(9 * u + phase)
    if kind == "checks":
        return np.sign(np.sin(10 * u + phase) * np.sin(10 * v))
    if kind == "rings":
        return np.sin(12 * np.hypot(u, v) + phase)
    if kind == "gradient":
        return np.clip(v, -1, 1)
    return np.zeros_like(u)  # smooth


PART_TEXTURES = {HEAD: "rings", FRONT_LEGS: "gradient", HIND_LEGS: "gradient", TAIL: "stripes"}


def _part_colour(part: int, rng: np.random.Generator) -> np.ndarray:
    hue = (PART_HUES[part] + rng.uniform(-0.03, 0.03)) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.9), rng.uniform(0.55, 0.95)))


def _background(rng: np.random.Generator) -> np.ndarray:
    """Low-saturation colours blended by a smooth random field, plus grain: [S, S, 3] in 0..1."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    field = sum(
        np.sin(2 * np.pi * (f * (np.cos(a) * x + np.sin(a) * y)) + p)
        for f, a, p in rng.uniform([1, 0, 0], [4, np.pi, 2 * np.pi], size=(3, 3))
    )
    blend = (field / 6 + 0.5)[..., None]
    colours = [np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.25), rng.uniform(0.3, 0.8))) for _ in "ab"]
    return colours[0] * blend + colours[1] * (1 - blend)


def render(class_name: str, rng: np.random.Generator,
           torso_texture: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 [S, S, 3] image, uint8 [S, S] part map) of a creature of `class_name`.

    `torso_texture` defaults to the class's own (demo-v1: a cue besides the shape)."""
    plan = ALL_BODY_PLANS[class_name]
    extent = max(np.hypot(e.x, e.y) + max(e.rx, e.ry) for ellipses in plan.values() for e in ellipses)
    u, v = _creature_frame(rng, extent)
    image, labels = _background(rng), np.full((IMAGE_SIZE, IMAGE_SIZE), BACKGROUND, np.uint8)
    for part in DRAW_ORDER:
        inside = np.any([_inside(u, v, e) for e in plan[part]], axis=0)
        kind = (torso_texture or TORSO_TEXTURE[class_name]) if part == TORSO else PART_TEXTURES[part]
        shade = 1.0 + 0.2 * _texture(kind, u, v, rng)[..., None]
        image = np.where(inside[..., None], _part_colour(part, rng) * shade, image)
        labels[inside] = part
    grain = rng.normal(0, 0.02, image.shape)
    return np.clip(np.round((image + grain) * 255), 0, 255).astype(np.uint8), labels


# ----------------------------------------------------------------------------- writing


def write_demo_dataset(root: str | Path, per_class: dict[str, int] | None = None, seed: int = 0,
                       classes: int | None = None) -> None:
    """Write the dataset under `root` (which must not hold one already).

    Args:
      root: destination folder.
      per_class: images per class and split; {'train': 128, 'val': 32} by default.
      seed: every image is drawn from numpy seeded by (seed, split, class, index).
      classes: None, demo-v1: the four `BODY_PLANS`, each with its own torso texture. A number
        K (<= 8): the harder variant, the first K of `ALL_BODY_PLANS` with a random torso texture,
        so that only the shapes and proportions tell the classes apart.
    """
    root = Path(root)
    per_class = per_class or {"train": 128, "val": 32}
    names = list(BODY_PLANS) if classes is None else list(ALL_BODY_PLANS)[:classes]
    for split_id, (split, count) in enumerate(per_class.items()):
        for class_id, class_name in enumerate(names):
            for k in range(count):
                rng = np.random.default_rng([seed, split_id, class_id, k])
                texture = None if classes is None else TEXTURES[rng.integers(len(TEXTURES))]
                image, labels = render(class_name, rng, texture)
                relative = Path(split) / class_name / f"{class_name}_{k:04d}"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / relative.with_suffix(".jpg"), quality=92)
                write_part_map(root / "parts" / relative.with_suffix(".png"), labels)
    meta = {
        "version": VERSION if classes is None else SHAPES_VERSION,
        "image_size": IMAGE_SIZE,
        "part_names": PART_NAMES,
        "classes": names,
        "images_per_class": per_class,
        "seed": seed,
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


def demo_data(cache_dir: str | Path | None = None, num_images: int | None = None,
              classes: int | None = None) -> Path:
    """The demo dataset's root, generated on first use: `<cache_dir>/demo-v1`.

    `cache_dir` defaults to `$SEMMAE_CACHE`, else `~/.cache/semmae_jax`. Use the root
    as `--data_path` and `root / 'parts'` as `--part_path`. With `num_images` (training
    images in all) or `classes` (up to 8), the harder variant instead (see
    `write_demo_dataset`): `<cache_dir>/demo-shapes-v1-<K>c-<N>`, N / K training and N / 4K
    validation images per class (defaults N = 4096, K = 8).
    """
    cache = Path(cache_dir or os.environ.get("SEMMAE_CACHE") or "~/.cache/semmae_jax").expanduser()
    if num_images is None and classes is None:
        return _generate_once(cache / VERSION, write_demo_dataset)
    num_images, classes = num_images or 4096, classes or len(ALL_BODY_PLANS)
    if not 2 <= classes <= len(ALL_BODY_PLANS):
        raise ValueError(f"--classes must be between 2 and {len(ALL_BODY_PLANS)}, got {classes}")
    if num_images % (4 * classes):
        raise ValueError(f"--num_images must be a multiple of 4 x --classes ({4 * classes}), got {num_images}")
    per_class = {"train": num_images // classes, "val": num_images // (4 * classes)}
    return _generate_once(cache / f"{SHAPES_VERSION}-{classes}c-{num_images}",
                          lambda root: write_demo_dataset(root, per_class, classes=classes))


def _generate_once(final: Path, write: Callable[[Path], None]) -> Path:
    """`final`, written by `write` into a temporary sibling folder renamed into place at the end."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-incomplete-", dir=final.parent))
    try:
        write(scratch)
        scratch.rename(final)  # atomic: the folder appears complete or not at all
    except OSError:
        if not final.is_dir():  # not a concurrent run finishing first
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def data_or_demo(data_path: str | None, part_path: str | None = None,
                 dataset: str = "folder") -> tuple[str | None, str | None]:
    """(data_path, part_path) as given, or, when no dataset is named at all, the demo data's
    root with its true part maps (unless `part_path` names others): every job's one fallback."""
    if data_path or dataset != "folder":
        return data_path, part_path
    root = demo_data()
    return str(root), part_path or str(root / "parts")


def main(argv: list[str] | None = None) -> None:
    """`python -m semmae_jax.data.demo [--num_images N --classes K] [--out CACHE]`: print the root."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m semmae_jax.data.demo", description=main.__doc__)
    parser.add_argument("--num_images", type=int, help="training images in all (the harder variant)")
    parser.add_argument("--classes", type=int, help="classes, up to 8 (the harder variant)")
    parser.add_argument("--out", help="cache folder (default: $SEMMAE_CACHE or ~/.cache/semmae_jax)")
    args = parser.parse_args(argv)
    try:
        print(demo_data(args.out, args.num_images, args.classes))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
