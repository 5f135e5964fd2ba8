"""Overhead of SemMAE's semantic masking over MAE's random masking, in the real train step.

    python bench/masking.py --model mae_vit_base_patch16 --batch 8 [--rounds 5]

Both steps are the project's jitted pretraining step on the same model, batch and part
maps (random 7-part maps); only `--setting` differs (0 random, 3 adaptive semantic). The
two are timed in alternating rounds so that machine noise hits both alike; the medians
and the overhead are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import job_step, pretrain_job, stepper, time_calls
from semmae_jax import masking, sharding
from semmae_jax.models import create_model


def build(model_name: str, setting: int, batch: dict[str, np.ndarray], dtype: str):
    """One step of `main.py pretrain --setting SETTING` (the job's recipe) on `batch`, compiled."""
    mesh = sharding.make_mesh("data:-1")
    state, step, _ = job_step(pretrain_job(model_name, "--dtype", dtype, "--setting", str(setting)), mesh,
                              batch["image"].shape[0])
    run = stepper(step, state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    jax.block_until_ready(run())  # compile
    return run


def noise_time(setting: int, labels: np.ndarray, repeats: int = 50) -> float:
    """Seconds for the masking noise alone (jitted), the part of the step the setting changes."""
    fn = jax.jit(lambda key, x: masking.masking_noise(key, x, setting=setting, mask_ratio=0.75, alpha=0.5))
    labels, keys = jnp.asarray(labels), iter(jax.random.split(jax.random.key(0), repeats + 1))
    return time_calls(lambda: fn(next(keys), labels).block_until_ready(), repeats, warmup=1).step_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    model = create_model(args.model)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((args.batch, *model.image_hw, model.in_chans), np.float32),
        "part_labels": rng.integers(-1, 7, (args.batch, model.num_patches)).astype(np.int32),
    }
    runs = {"random (setting 0)": build(args.model, 0, batch, args.dtype),
            "semantic (setting 3)": build(args.model, 3, batch, args.dtype)}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(time_calls(run, args.steps, warmup=0).step_s)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"model {args.model}, batch {args.batch}, {jax.devices()[0].platform} x {jax.device_count()}, "
          f"{args.rounds} rounds x {args.steps} steps, dtype {args.dtype}")
    for name, seconds in medians.items():
        print(f"{name:22s} {seconds * 1e3:9.1f} ms/step")
    random_s, semantic_s = medians.values()
    print(f"semantic-masking overhead in the step: {100 * (semantic_s / random_s - 1):+.2f}%")
    extra = noise_time(3, batch["part_labels"]) - noise_time(0, batch["part_labels"])
    print(f"the noise alone: semantic - random = {extra * 1e3:.2f} ms per step "
          f"= {100 * extra / random_s:.2f}% of the random-masking step")


if __name__ == "__main__":
    main()
