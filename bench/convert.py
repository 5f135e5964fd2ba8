"""Time and peak memory of converting a ViT-L MAE checkpoint both ways, file I/O included.

    python bench/convert.py [--model mae_vit_large_patch16] [--dtype float32]

Builds random weights of the model's shapes, saves them as `{'model': state_dict}` (MAE's
release layout) in a temporary directory, then runs each direction in a fresh process:

- to-flax: `params_from_checkpoint(x.pth)` (safe load, inference, checks, mapping) and
  `save_params` (orbax), as `python -m convert to-flax`;
- to-torch: `params_from_checkpoint(orbax dir)`, `flax_to_torch`, `save_torch_checkpoint`,
  as `python -m convert to-torch`.

Memory is the process's peak resident set (`resource.getrusage(...).ru_maxrss`): whole
process, torch's and orbax's buffers included (tracemalloc would miss those), reported
as the peak and as its rise over the process after its imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import convert  # noqa: E402
from convert.arch import Architecture  # noqa: E402
from semmae_jax.checkpoint import save_params  # noqa: E402

MiB = 2**20


def peak_rss() -> int:
    """Peak resident set of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def to_flax(source: Path, target: Path) -> dict[str, float]:
    start = time.perf_counter()
    params, name, overrides = convert.params_from_checkpoint(source)
    converted = time.perf_counter()
    save_params(target, params, meta={"model": name, "model_overrides": overrides, "source": str(source)})
    return {"read + convert (s)": converted - start, "write (s)": time.perf_counter() - converted}


def to_torch(source: Path, target: Path) -> dict[str, float]:
    start = time.perf_counter()
    params, name, overrides = convert.params_from_checkpoint(source)
    state_dict = convert.flax_to_torch(params, name, model_overrides=overrides)
    converted = time.perf_counter()
    convert.save_torch_checkpoint(target, state_dict)
    return {"read + convert (s)": converted - start, "write (s)": time.perf_counter() - converted}


def worker(direction: str, source: str, target: str) -> None:
    """One direction in this (fresh) process; prints its figures as one JSON line."""
    import torch  # noqa: F401  (imported up front so the baseline holds it, as in the CLI)

    baseline = peak_rss()
    figures = {"to-flax": to_flax, "to-torch": to_torch}[direction](Path(source), Path(target))
    figures["peak RSS (MiB)"] = peak_rss() / MiB
    figures["rise over imports (MiB)"] = (peak_rss() - baseline) / MiB
    print(json.dumps(figures))


def run_worker(direction: str, source: Path, target: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", direction, str(source), str(target)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"total incl. start-up (s)": time.perf_counter() - start, **figures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mae_vit_large_patch16")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--worker", nargs=3, metavar=("DIRECTION", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[args.dtype]
        shapes = Architecture(args.model).torch_shapes()
        state_dict = {k: rng.standard_normal(s, dtype=np.float32).astype(dtype) for k, s in shapes.items()}
        convert.save_torch_checkpoint(tmp / "in.pth", state_dict)
        size = (tmp / "in.pth").stat().st_size / MiB
        count = sum(v.size for v in state_dict.values())
        del state_dict
        results = {
            "to-flax": run_worker("to-flax", tmp / "in.pth", tmp / "orbax"),
            "to-torch": run_worker("to-torch", tmp / "orbax", tmp / "out.pth"),
        }
    print(f"{args.model}, {args.dtype}: {count / 1e6:.1f}M parameters, .pth of {size:.0f} MiB")
    rows = list(results["to-flax"])
    print(f"{'':28}{'to-flax':>12}{'to-torch':>12}")
    for row in rows:
        print(f"{row:28}" + "".join(f"{results[d][row]:>12.1f}" for d in results))


if __name__ == "__main__":
    main()
