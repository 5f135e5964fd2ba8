"""One MAE pretraining step (forward, backward, AdamW update), JAX vs PyTorch, side by side.

    python bench/step.py --model mae_vit_base_patch16 --batch 8 [--steps 5] [--dtype float32] [--trace DIR] [--gemm]

JAX runs `main.py pretrain`'s own jitted step, built by the job's recipe (random masking, its AdamW;
`bench/common.py`); PyTorch runs transformers' `ViTMAEForPreTraining` of the same shape with
`torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.05)` on the same batch and noise. Both use all
the machine's cores and run in one process that, as every `main.py` command, has restarted with
malloc on transparent huge pages (`semmae_jax.runtime.host_memory`; run with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to time both without). Prints the CPU (model, cores, vector
extensions), images/s for each and the ratio, and the ceiling the cores set: the step's model FLOPs
at the rate of a large square matmul, the most any implementation could reach (`ceiling`);
`--trace DIR` also traces two JAX steps and prints where their time goes, by kind of XLA op, and
how much of the wall time ran matmuls, other ops only (elementwise loops, copies; one alone leaves
the other cores idle, and which kinds did) or nothing (`bench/op_times.py`); `--gemm` times the
step's largest matmuls alone, JAX against PyTorch.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np
import torch

from bench import op_times
from bench.common import job_step, pretrain_job, stepper, time_calls
from convert.arch import full_config
from convert.parity.references import hf_mae
from semmae_jax import flops, sharding
from semmae_jax.models import create_model
from semmae_jax.runtime import host_memory

BLR, WEIGHT_DECAY, BETAS = 1.5e-4, 0.05, (0.9, 0.95)  # main_pretrain.py's, as `pretrain`'s defaults


def jax_step_time(name: str, images: np.ndarray, steps: int, dtype: str, trace: str | None = None) -> float:
    """Seconds per step of `main.py pretrain`'s own step (random masking) on one batch (and, with
    `trace`, where two more steps' time goes)."""
    mesh = sharding.make_mesh("data:-1")
    state, step, built = job_step(pretrain_job(name, "--dtype", dtype, "--setting", "0"), mesh, images.shape[0])
    labels = -np.ones((images.shape[0], built.model.num_patches), np.int32)
    batch = jax.device_put({"image": images, "part_labels": labels}, sharding.batch_sharding(mesh))
    call = stepper(step, state, batch)
    seconds = time_calls(call, steps).step_s
    if trace:
        traced = op_times.trace_calls(call, 2, trace)
        print(op_times.table(op_times.op_kinds(traced, 2)))
        print("wall time per step by what ran: " + ", ".join(
            f"{state} {ms:.0f} ms" for state, ms in op_times.wall_split(traced, 2).items()))
        print("one other op alone (the other cores idle), by kind: " + ", ".join(
            f"{kind} {ms:.0f} ms" for kind, ms in op_times.alone_by_kind(traced, 2)[:6]))
    return seconds


def torch_step_time(name: str, images: np.ndarray, steps: int) -> float:
    """Seconds per step of transformers' MAE with torch's AdamW, MAE's betas and weight decay."""
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

    return time_calls(run, steps, wait=lambda _: None).step_s


# The step's largest matmuls for mae_vit_base_patch16, batch 8 (M = tokens x batch): the encoder's
# (50 tokens) and decoder's (197) qkv and MLP, as [M, K] @ [K, N].
GEMMS = ((400, 768, 2304), (400, 768, 3072), (400, 3072, 768), (1576, 512, 1536), (1576, 512, 2048), (1576, 2048, 512))


# A square matmul large enough that a good kernel runs at the cores' arithmetic peak.
PEAK_GEMM = (2048, 2048, 2048)


def gemm_rates(shapes: tuple[tuple[int, int, int], ...] = GEMMS, calls: int = 20,
               dtype: str = "float32") -> list[tuple[str, float, float]]:
    """(shape, JAX GFLOP/s, PyTorch GFLOP/s) of one `dtype` matmul each, alone: what the matmul
    kernels do outside the step, on all cores."""
    torch.set_num_threads(os.cpu_count())
    matmul = jax.jit(jax.numpy.matmul)

    def rates(m: int, k: int, n: int) -> tuple[str, float, float]:
        a, b = (np.random.default_rng(0).standard_normal(shape, np.float32) for shape in ((m, k), (k, n)))
        jax_a, jax_b = (jax.device_put(x).astype(dtype) for x in (a, b))
        torch_a, torch_b = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (a, b))
        jax_s = time_calls(lambda: matmul(jax_a, jax_b), calls).step_s
        torch_s = time_calls(lambda: torch_a @ torch_b, calls, wait=lambda _: None).step_s
        return f"[{m}, {k}] @ [{k}, {n}]", 2 * m * k * n / jax_s / 1e9, 2 * m * k * n / torch_s / 1e9

    return [rates(*shape) for shape in shapes]


def ceiling(name: str, batch: int, dtype: str, jax_s: float, torch_s: float) -> str:
    """What the cores allow: the step's model FLOPs (`flops.train_flops`, matmuls only) at the rate
    of the faster framework's large square matmul take `floor` seconds, so no implementation of the
    step, however its other work is arranged, beats PyTorch's by more than torch_s / floor here."""
    _, jax_rate, torch_rate = gemm_rates((PEAK_GEMM,), calls=10, dtype=dtype)[0]
    peak = max(jax_rate, torch_rate)
    step_gflop = flops.train_flops(create_model(name)) * batch / 1e9
    floor_s = step_gflop / peak
    return (f"ceiling: {dtype} {PEAK_GEMM} matmul {peak:.0f} GFLOP/s (JAX {jax_rate:.0f}, PyTorch {torch_rate:.0f}); "
            f"the step's {step_gflop:.1f} GFLOP take {floor_s * 1e3:.0f} ms at that rate, so at most "
            f"{torch_s / floor_s:.2f}x PyTorch here; the steps run at JAX {step_gflop / jax_s:.0f} "
            f"({step_gflop / jax_s / peak:.0%}), PyTorch {step_gflop / torch_s:.0f} GFLOP/s ({step_gflop / torch_s / peak:.0%})")


def cpu_description() -> str:
    """'MODEL (family F, model M), N cores, VECTOR EXTENSIONS': what a CPU figure depends on most
    (read from Linux's /proc/cpuinfo; a virtual machine may name only the vendor's line)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def field(name: str) -> str:
        found = re.search(rf"^{name}\s*:\s*(.*)$", info, re.M)
        return found.group(1).strip() if found else ""

    flags = set(field("flags").split())
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
              if f in flags]
    return (f"{field('model name') or platform.processor() or 'unknown CPU'} (family {field('cpu family') or '?'}, "
            f"model {field('model') or '?'}), {os.cpu_count()} cores, {' '.join(vector) or 'no AVX2'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--trace", default=None, help="also trace two JAX steps into this directory")
    parser.add_argument("--gemm", action="store_true", help="also time the step's largest matmuls alone (GFLOP/s)")
    args = parser.parse_args(argv)
    if argv is None:
        host_memory.restart_with_huge_pages()
    size = create_model(args.model).img_size
    images = np.random.default_rng(0).standard_normal((args.batch, size, size, 3), np.float32)
    # Each line as soon as it is known, so that a run stopped part-way still says what it measured, and where.
    print(f"model {args.model}, batch {args.batch}, {args.steps} timed steps, {jax.devices()[0].platform}, "
          f"JAX dtype {args.dtype}; {cpu_description()}; {host_memory.describe()}", flush=True)
    jax_s = jax_step_time(args.model, images, args.steps, args.dtype, args.trace)
    print(f"JAX     {args.batch / jax_s:8.2f} images/s  ({jax_s * 1e3:.0f} ms/step)", flush=True)
    torch_s = torch_step_time(args.model, images, args.steps)
    print(f"PyTorch {args.batch / torch_s:8.2f} images/s  ({torch_s * 1e3:.0f} ms/step)")
    print(f"ratio JAX / PyTorch: {torch_s / jax_s:.2f}x")
    print(ceiling(args.model, args.batch, args.dtype, jax_s, torch_s))
    if args.gemm:
        for shape, jax_rate, torch_rate in gemm_rates():
            print(f"matmul {shape:24s} JAX {jax_rate:6.1f} GFLOP/s  PyTorch {torch_rate:6.1f} GFLOP/s  "
                  f"{jax_rate / torch_rate:.2f}x")


if __name__ == "__main__":
    main()
