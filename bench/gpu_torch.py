"""The PyTorch reference of `bench/gpu.py`: transformers' `ViTMAEForPreTraining` of the same
shape as the JAX model (`convert.parity.references.hf_mae`), SDPA attention, bf16 autocast over
float32 parameters, `torch.optim.AdamW` with MAE's betas, the same batch; optionally under
`torch.compile`. Runs in its own child process, so JAX holds no device memory beside it.
"""

from __future__ import annotations

import gc
import resource
from typing import Any

import torch

from bench.common import time_calls
from convert.arch import full_config
from convert.parity.references import hf_mae

BETAS, WEIGHT_DECAY, LR = (0.9, 0.95), 0.05, 1e-4


def build(model_name: str, device: torch.device, compile_backend: str | None) -> tuple[Any, Any, torch.nn.Module]:
    """(model to call, optimizer, the module) on `device`."""
    module = hf_mae(full_config(model_name)).train().to(device)
    if hasattr(module, "set_attn_implementation"):  # else transformers' default, which is SDPA where torch has it
        module.set_attn_implementation("sdpa")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    call = torch.compile(module, backend=compile_backend) if compile_backend else module
    return call, opt, module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_at(model_name: str, batch: int, device: torch.device, compile_backend: str | None, warmup: int,
            steps: int) -> dict[str, Any]:
    """One batch size: seconds of the warm-up (compilation with torch.compile) and per timed step."""
    call, opt, module = build(model_name, device, compile_backend)
    size = module.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = call(pixel_values=pixels).loss
        loss.backward()
        opt.step()

    timing = time_calls(step, steps, warmup=warmup, wait=lambda _: synchronize(device))
    seconds = timing.step_s
    return {"batch": batch, "images_per_s": batch / seconds, "ms_per_step": seconds * 1e3,
            "compile_s": max(timing.warmup_s - warmup * seconds, 0.0) if compile_backend else 0.0,
            "attn_implementation": module.config._attn_implementation}


def train_step(model_name: str, *, max_batch: int, compile_backend: str | None, warmup: int,
               steps: int) -> dict[str, Any]:
    """The largest batch <= `max_batch` (halving on CUDA out-of-memory), timed, with its peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = max_batch
    while batch >= 1:
        gc.collect()  # the last try's model and optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = time_at(model_name, batch, device, compile_backend, warmup, steps)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:  # inductor wraps the OOMs it meets
            if not isinstance(error, torch.cuda.OutOfMemoryError) and "out of memory" not in str(error).lower():
                raise
            batch //= 2
            continue
        return {**row, **peak_memory(device), "torch": torch.__version__,
                "torch_compile": compile_backend or "off"}
    raise RuntimeError("PyTorch: not even a batch of 1 fits")


def peak_memory(device: torch.device) -> dict[str, Any]:
    """`torch.cuda.max_memory_allocated` on a GPU; on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory_source": "torch.cuda.max_memory_allocated"}
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "memory_source": "host max RSS (CPU)"}
