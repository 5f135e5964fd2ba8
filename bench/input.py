"""Pretraining input pipeline: images/s of this project's tf.data pipeline vs torchvision's.

    python bench/input.py [--num_images 512] [--batch_size 32] [--num_workers N] [--repeats 2]

Both pipelines read the same JPEGs (demo creatures enlarged to ImageNet-like 500 x 375,
written to a temporary folder) with MAE's pretraining transform: RandomResizedCrop
(scale 0.2-1, bicubic) + horizontal flip + ToTensor + Normalize. torchvision runs
`ImageFolder` + `DataLoader(num_workers=N)`; ours `TrainLoader(num_workers=N)`.

The first batch of each (start-up, worker spawn, graph tracing) is not timed. The two
run alternately `--repeats` times and the best of each is kept, which tames other load
on the machine; the CPU time per image (all threads and worker processes) is printed
too, as it depends far less on that load than images/s does.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
import torch  # torch/torchvision before TensorFlow: triton crashes if loaded after TF
import torchvision.transforms as T
from torchvision.datasets import ImageFolder

from semmae_jax.data.demo import write_large_jpegs
from semmae_jax.data.pipeline import TrainLoader
from semmae_jax.data.sources import image_folder
from semmae_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform


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


def ours(root: Path, batch_size: int, num_workers: int) -> tuple[float, float]:
    loader = TrainLoader(
        image_folder(root),
        batch_size=batch_size,
        transform=TrainTransform(img_size=224),
        num_workers=num_workers,
        process_index=0,
        process_count=1,
    )
    return measure(loader.epoch_batches(0), batch_size, loader.steps_per_epoch)


def torchvision_baseline(root: Path, batch_size: int, num_workers: int) -> tuple[float, float]:
    transform = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = ImageFolder(root / "train", transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True
    )
    return measure(loader, batch_size, len(loader))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"semmae_jax tf.data": [], "torchvision ImageFolder": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_large_jpegs(Path(tmp), args.num_images)
        for _ in range(args.repeats):
            results["semmae_jax tf.data"].append(ours(root, args.batch_size, args.num_workers))
            results["torchvision ImageFolder"].append(torchvision_baseline(root, args.batch_size, args.num_workers))
    print(
        f"{args.num_images} JPEGs of 500x375 -> 224, batch {args.batch_size}, {args.num_workers} workers, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    best = {name: (max(r[0] for r in runs), min(r[1] for r in runs)) for name, runs in results.items()}
    for name, (rate, cpu) in best.items():
        print(f"{name:25s} {rate:8.1f} images/s  {cpu:6.2f} CPU ms/image")
    (ours_rate, ours_cpu), (their_rate, their_cpu) = best.values()
    print(f"{'ratio':25s} {ours_rate / their_rate:8.2f}x         {their_cpu / ours_cpu:6.2f}x less CPU per image")


if __name__ == "__main__":
    main()
