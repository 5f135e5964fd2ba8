"""Pretraining input pipeline: images/s of this project's tf.data pipeline vs torchvision's.

    python bench/input.py [--num_images 512] [--batch_size 32] [--num_workers N] [--repeats 3]
    python bench/input.py --profile     # where the time goes: CPU ms per image and operation

Both pipelines read the same JPEGs, real photographs (scikit-learn's two sample photos,
cut into 500 x 375 windows at random places, randomly mirrored, saved at quality 90:
ImageNet's typical size), with MAE's pretraining transform: RandomResizedCrop (scale
0.2-1, bicubic) + horizontal flip + ToTensor + Normalize, with and without a part map
(a PNG at the image's resolution, through the same crop and flip, voted per 16 x 16
patch). torchvision runs `ImageFolder` + `DataLoader(num_workers=N)`, normalising on
the host as it does; ours `TrainLoader(num_workers=N)`, which hands uint8 batches to
the device (normalising them there is the device's work, not the host's). A third row
reads the same images from a packed copy (`main.py prepare`).

The first batch of each run (start-up, worker spawn, graph tracing) is not timed. The
pipelines run alternately `--repeats` times and the best of each is kept, which tames
other load on the machine; the CPU time per image (all threads and worker processes)
is printed too, as it depends far less on that load than images/s does.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import io
import itertools
import os
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import psutil
import torch  # torch/torchvision before TensorFlow: triton crashes if loaded after TF
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.datasets import ImageFolder

from semmae_jax import flops
from semmae_jax.data import packed
from semmae_jax.data.datasets import open_source
from semmae_jax.data.part_maps import NO_PART, part_map_path, read_part_map, write_part_map
from semmae_jax.data.pipeline import TrainLoader
from semmae_jax.data.sources import Shard, Source
from semmae_jax.data.tf_runtime import tf
from semmae_jax.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainTransform,
    decode_window,
    normalize,
    random_resized_crop_window,
    resize,
    warped_part_labels,
)
from semmae_jax.models import create_model

SIZE, PATCH = 224, 16
SCALE = (0.2, 1.0)


def write_photo_jpegs(root: Path, num_images: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """`root/train/<photo>/*.jpg` (windows of real photographs) and `root/parts/...` part maps (PNG)."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    for k in range(num_images):
        photo = photos.images[k % len(photos.images)]
        top = rng.integers(0, photo.shape[0] - size[1] + 1)
        left = rng.integers(0, photo.shape[1] - size[0] + 1)
        pixels = photo[top : top + size[1], left : left + size[0]]
        pixels = pixels[:, ::-1] if rng.random() < 0.5 else pixels
        path = root / "train" / f"photo{k % len(photos.images)}" / f"{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=90)
        parts = (pixels.mean(axis=2) // 52).astype(np.uint8)  # 5 parts by brightness: blobs like a part map's
        write_part_map(part_map_path(root / "parts", root, path), parts)
    return root


# --------------------------------------------------------------------------- runs


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its live worker processes."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def measure(batches: Iterable, batch_size: int, num_batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over batches 2 .. num_batches (workers still alive at the end)."""
    iterator = iter(batches)
    next(iterator)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in itertools.islice(iterator, num_batches - 1):
        pass
    images = (num_batches - 1) * batch_size
    return images / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / images


def ours(source: Source, batch_size: int, num_workers: int) -> tuple[float, float]:
    loader = TrainLoader(
        source,
        process_batch=batch_size,
        transform=TrainTransform(img_size=SIZE, patch_size=PATCH),
        num_workers=num_workers,
        process_index=0,
        process_count=1,
    )
    return measure(loader.epoch_batches(0), batch_size, loader.steps_per_epoch)


def patch_vote_torch(part_map: torch.Tensor) -> torch.Tensor:
    """Majority part per patch (ties to the smallest value), -1 for none: the vote, in torch."""
    patches = part_map.reshape(SIZE // PATCH, PATCH, SIZE // PATCH, PATCH).permute(0, 2, 1, 3).reshape(-1, PATCH**2)
    counts = torch.zeros(len(patches), NO_PART + 1).scatter_add_(1, patches.long(), torch.ones(patches.shape))
    winner = counts.argmax(1)  # first maximum: the smallest value
    return torch.where(winner == NO_PART, -1, winner)


class PartFolder(ImageFolder):
    """torchvision's ImageFolder with the part map through the same RandomResizedCrop and flip."""

    def __init__(self, root: Path, part_root: Path, transform: Callable) -> None:
        super().__init__(str(root / "train"))
        self.data_root, self.part_root, self.tail = root, part_root, transform

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, label = self.samples[k]
        image = self.loader(path)
        part = Image.fromarray(read_part_map(part_map_path(self.part_root, self.data_root, path)))
        top, left, h, w = T.RandomResizedCrop.get_params(image, SCALE, (3 / 4, 4 / 3))
        image = F.resized_crop(image, top, left, h, w, [SIZE, SIZE], T.InterpolationMode.BICUBIC)
        part = F.resized_crop(part, top, left, h, w, [SIZE, SIZE], T.InterpolationMode.NEAREST)
        if torch.rand(1) < 0.5:
            image, part = F.hflip(image), F.hflip(part)
        return self.tail(image), patch_vote_torch(torch.from_numpy(np.array(part))), label


def torchvision_baseline(root: Path, batch_size: int, num_workers: int, parts: bool) -> tuple[float, float]:
    tail = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if parts:
        dataset = PartFolder(root, root / "parts", tail)
    else:
        crop = T.RandomResizedCrop(SIZE, scale=SCALE, interpolation=T.InterpolationMode.BICUBIC)
        dataset = ImageFolder(str(root / "train"), transform=T.Compose([crop, T.RandomHorizontalFlip(), tail]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True
    )
    return measure(loader, batch_size, len(loader))


def compare(root: Path, packed_root: Path, args: argparse.Namespace) -> None:
    runs: dict[str, Callable[[], tuple[float, float]]] = {
        "torchvision, no part map": lambda: torchvision_baseline(root, args.batch_size, args.num_workers, False),
        "ours, no part map": lambda: ours(open_source(root), args.batch_size, args.num_workers),
        "torchvision, part map": lambda: torchvision_baseline(root, args.batch_size, args.num_workers, True),
        "ours, part map": lambda: ours(open_source(root, part_path=root / "parts"), args.batch_size, args.num_workers),
        "ours, part map, packed": lambda: ours(open_source(packed_root), args.batch_size, args.num_workers),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            results[name].append(run())
    cores = len(os.sched_getaffinity(0))
    print(
        f"{args.num_images} photo JPEGs of 500x375 -> {SIZE}, batch {args.batch_size}, {args.num_workers} workers, "
        f"{cores} cores, best of {args.repeats} alternating runs, load average {os.getloadavg()[0]:.1f} at the end"
    )
    best = {name: (max(r[0] for r in runs), min(r[1] for r in runs)) for name, runs in results.items()}
    for name, (rate, cpu) in best.items():
        print(f"{name:26s} {rate:7.1f} images/s ({rate / cores:6.1f} per core)  {cpu:5.2f} CPU ms/image")
    for kind in ("no part map", "part map"):
        (theirs, their_cpu), (mine, my_cpu) = best[f"torchvision, {kind}"], best[f"ours, {kind}"]
        print(f"ratio, {kind:15s} {mine / theirs:5.2f}x images/s, {their_cpu / my_cpu:5.2f}x less CPU per image")
    print(f"packed / folder (part map)  {best['ours, part map, packed'][0] / best['ours, part map'][0]:5.2f}x images/s")
    cores_per_gpu({name: best[name][1] for name in list(best)[:4]})


# --------------------------------------------------------------- cores per GPU

GPU = "NVIDIA H100"  # the peak of `semmae_jax.flops.PEAKS` the cores are counted for
MFU = 0.40


def cores_per_gpu(cpu_ms: dict[str, float]) -> None:
    """Cores one GPU needs at 40 % MFU, from each pipeline's CPU ms per image (1000 / ms images/s per busy core:
    steadier on a shared machine than images/s)."""
    peak = flops.peak_tflops(GPU) * 1e12
    print(f"cores per GPU at {MFU:.0%} MFU of {peak / 1e12:.0f} TFLOP/s ({GPU}; from the FLOP count):")
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16"):
        per_image = flops.train_flops(create_model(name, img_size=SIZE))
        rate = MFU * peak / per_image
        needs = ", ".join(f"{pipeline} {rate * ms / 1000:.1f}" for pipeline, ms in cpu_ms.items())
        print(f"  {name}: {per_image / 1e9:.1f} GFLOP/image -> {rate:.0f} images/s; cores: {needs}")


# ------------------------------------------------------------------------ profile


def _cached(data: tf.data.Dataset) -> tf.data.Dataset:
    """`data` computed once and kept in memory: the input of the next stage, costing nothing to read."""
    data = data.cache()
    for _ in data:
        pass
    return data


def _single_threaded(data: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return data.with_options(options)


def tf_stage_costs(root: Path) -> dict[str, Callable[[], object]]:
    """Our transform cut into stages, each fed from the previous one's cached output (runs to time)."""
    source = open_source(root, part_path=root / "parts")

    def windowed(raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        seed = tf.random.experimental.stateless_fold_in(tf.constant([0, 0], tf.int64), raw["id"])
        crop_seed, flip_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        size = tf.io.extract_jpeg_shape(raw["image"])[:2]
        window = random_resized_crop_window(crop_seed, size[0], size[1], SCALE)
        return {**raw, "window": window, "size": size, "flip": tf.random.stateless_uniform([], flip_seed) < 0.5}

    def decode(e: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {**e, "pixels": decode_window(e, lambda h, w: e["window"], SIZE).pixels}

    def resized(kernel: str) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
        def run(e: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            if kernel == "tf":
                image = tf.saturate_cast(tf.round(tf.image.resize(e["pixels"], (SIZE, SIZE), "bicubic", antialias=True)),
                                         tf.uint8)
            else:
                image = resize(e["pixels"], (SIZE, SIZE), "bicubic", kernel, e["flip"])
            return {"image": image, **{k: e[k] for k in ("part", "window", "size", "flip")}}
        return run

    def parts(e: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        labels = warped_part_labels(e["part"], e["window"], e["size"], SIZE, PATCH, e["flip"])
        return {"image": e["image"], "part_labels": labels}

    refs = _single_threaded(source.eval_stream(Shard(0, 1)).refs)
    files = _cached(refs.map(lambda ref: {**source.load(ref), "id": ref["id"]}))
    windows = _cached(files.map(windowed))
    crops = _cached(windows.map(decode))
    images = _cached(crops.map(resized("torch")))
    elements = _cached(images.map(parts))
    batched = _cached(elements.batch(32))

    def timed(data: tf.data.Dataset, fn: Callable) -> Callable[[], object]:
        mapped = _single_threaded(data.map(fn))
        return lambda: [None for _ in mapped]

    return {
        "read the files (image + part map)": timed(refs, lambda r: {**source.load(r)}),
        "JPEG header + crop window": timed(files, windowed),
        "decode the window (libjpeg)": timed(windows, decode),
        "resize to 224 + flip (torch's uint8 kernel)": timed(crops, resized("torch")),
        "part map: decode, warp, vote": timed(images, parts),
        "batch of 32 (uint8)": lambda: [None for _ in _single_threaded(elements.batch(32))],
        "(normalise on the host: now on the device)": timed(batched, lambda b: normalize(b["image"])),
        "(resize + flip with PIL: torchvision's pixels)": timed(crops, resized("pil")),
        "(resize with tf.image.resize, no flip)": timed(crops, resized("tf")),
        "(tf.data's own cost per element and stage)": timed(images, lambda e: e["flip"]),
    }


def _best_cpu_ms(runs: dict[str, Callable[[], object]], count: int, repeats: int = 5) -> dict[str, float]:
    """CPU ms per image of each run: the least of `repeats` rounds, the runs interleaved (load only adds time)."""
    for run in runs.values():
        run()  # warm-up: tracing, file cache
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - start)
    return {name: 1000 * seconds / count for name, seconds in best.items()}


def torch_part_labels(path: Path, window: tuple[int, int, int, int]) -> torch.Tensor:
    """The part map's per-patch labels as `PartFolder` makes them (flipped)."""
    part = Image.fromarray(read_part_map(path))
    part = F.hflip(F.resized_crop(part, *window, [SIZE, SIZE], T.InterpolationMode.NEAREST))
    return patch_vote_torch(torch.from_numpy(np.array(part)))


def torchvision_stage_costs(root: Path) -> dict[str, Callable[[], object]]:
    """torchvision's transform op by op, on one thread, each op's input made beforehand (runs to time)."""
    torch.set_num_threads(1)
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    rng = np.random.default_rng(0)
    datas = [Path(p).read_bytes() for p in paths]
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
    windows = [T.RandomResizedCrop.get_params(image, SCALE, (3 / 4, 4 / 3)) for image in images]
    crops = [F.resized_crop(im, *w, [SIZE, SIZE], T.InterpolationMode.BICUBIC) for im, w in zip(images, windows, strict=True)]
    tensors = [F.to_tensor(c) for c in crops]
    parts = [part_map_path(root / "parts", root, p) for p in paths]
    n = len(paths)
    ops = {
        "read + decode the JPEG (PIL)": lambda: [Image.open(p).convert("RGB") for p in paths],
        "RandomResizedCrop (window, crop, bicubic)": lambda: [
            F.resized_crop(im, *T.RandomResizedCrop.get_params(im, SCALE, (3 / 4, 4 / 3)), [SIZE, SIZE],
                           T.InterpolationMode.BICUBIC) for im in images],
        "horizontal flip": lambda: [F.hflip(c) for c in crops if rng.random() < 2],
        "ToTensor": lambda: [F.to_tensor(c) for c in crops],
        "Normalize": lambda: [F.normalize(t, IMAGENET_MEAN, IMAGENET_STD) for t in tensors],
        "collate a batch of 32 (float32)": lambda: [
            torch.utils.data.default_collate(tensors[i : i + 32]) for i in range(0, n - 31, 32)],
        "part map: read, crop, nearest, flip, vote": lambda: [
            torch_part_labels(p, w) for p, w in zip(parts, windows, strict=True)],
    }
    return ops


def profile(root: Path) -> None:
    count = len(list((root / "train").rglob("*.jpg")))
    print(f"CPU ms per image, one thread, {count} photo JPEGs of 500x375 -> {SIZE}, least of 5 interleaved "
          f"rounds, load average {os.getloadavg()[0]:.1f}")
    for title, runs in (("ours (tf.data)", tf_stage_costs(root)), ("torchvision", torchvision_stage_costs(root))):
        costs = _best_cpu_ms(runs, count)
        print(f"{title}:")
        for name, ms in costs.items():
            print(f"  {name:46s} {ms:6.2f}")
        print(f"  {'total (rows not in parentheses)':46s} {sum(v for k, v in costs.items() if k[0] != '('):6.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="CPU ms per image and operation, both pipelines")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_photo_jpegs(Path(tmp) / "photos", args.num_images)
        if args.profile:
            profile(root)
            return
        start = time.perf_counter()
        packed.prepare(root, Path(tmp) / "packed", part_path=root / "parts")
        seconds = time.perf_counter() - start
        print(f"prepare (folder -> packed, with part maps): {1000 * seconds / args.num_images:.2f} s per 1,000 images")
        compare(root, Path(tmp) / "packed", args)


if __name__ == "__main__":
    main()
