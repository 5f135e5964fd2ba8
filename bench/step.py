"""One MAE pretraining step (forward, backward, AdamW update), JAX vs PyTorch, side by side.

    python bench/step.py --model mae_vit_base_patch16 --batch 8 [--steps 5] [--dtype float32]

JAX runs the project's own jitted step (`semmae_jax.train.steps`, random masking, the
MAE optimizer); PyTorch runs transformers' `ViTMAEForPreTraining` of the same shape
with `torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.05)` on the same batch and
noise. Both use all the machine's cores. Prints images/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert.arch import full_config
from convert.references import hf_mae
from semmae_jax import sharding
from semmae_jax.models import create_model, frozen_param_names
from semmae_jax.train import optim
from semmae_jax.train.state import create_state
from semmae_jax.train.steps import jit_step, make_pretrain_step

BLR, WEIGHT_DECAY, BETAS = 1.5e-4, 0.05, (0.9, 0.95)


def time_steps(run_step, steps: int) -> float:
    """Seconds per step, after two untimed warm-up steps (compilation, allocation)."""
    for _ in range(2):
        run_step()
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    return (time.perf_counter() - start) / steps


def jax_step_time(name: str, images: np.ndarray, steps: int, dtype: str) -> float:
    model = create_model(name, dtype=dtype)
    mesh = sharding.make_mesh("data:-1")
    lr = BLR * images.shape[0] / 256

    def make_tx(params):
        return optim.adamw(params, optim.warmup_cosine(lr, 0.0, 0, 10**6), weight_decay=WEIGHT_DECAY, betas=BETAS,
                           frozen=frozen_param_names(model))

    example = (jax.ShapeDtypeStruct(images.shape, jnp.float32),)
    with jax.set_mesh(mesh):
        state, shardings, tx = create_state(model, make_tx, example, mesh, seed=0)
        batch_sharding = sharding.batch_sharding(mesh)
        step = jit_step(make_pretrain_step(model, tx, mask_ratio=0.75, setting=0, num_parts=8), shardings,
                        batch_sharding, mesh)
        num_patches = model.num_patches
        batch = jax.device_put({"image": images, "part_labels": -np.ones((images.shape[0], num_patches), np.int32)},
                               batch_sharding)
        holder = {"state": state}

        def run() -> None:
            holder["state"], metrics = step(holder["state"], batch)
            metrics["loss"].block_until_ready()

        return time_steps(run, steps)


def torch_step_time(name: str, images: np.ndarray, steps: int) -> float:
    torch.set_num_threads(os.cpu_count())
    model = hf_mae(full_config(name)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=BLR * images.shape[0] / 256,
                            betas=BETAS, weight_decay=WEIGHT_DECAY)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    num_patches = (images.shape[1] // model.config.patch_size) ** 2
    noise = torch.rand(images.shape[0], num_patches, generator=torch.Generator().manual_seed(0))

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        model(pixel_values=pixels, noise=noise).loss.backward()
        opt.step()

    return time_steps(run, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    size = create_model(args.model).img_size
    images = np.random.default_rng(0).standard_normal((args.batch, size, size, 3), np.float32)
    jax_s = jax_step_time(args.model, images, args.steps, args.dtype)
    torch_s = torch_step_time(args.model, images, args.steps)
    print(f"model {args.model}, batch {args.batch}, {args.steps} timed steps, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cores, JAX dtype {args.dtype}")
    print(f"JAX     {args.batch / jax_s:8.2f} images/s  ({jax_s * 1e3:.0f} ms/step)")
    print(f"PyTorch {args.batch / torch_s:8.2f} images/s  ({torch_s * 1e3:.0f} ms/step)")
    print(f"ratio JAX / PyTorch: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    main()
