"""Per-device memory of the compiled pretraining step, data-parallel vs FSDP, on big meshes.

    python bench/memory.py [--models mae_vit_base_patch16,...] [--devices 8,64,256] [--batch 4096]

Nothing runs: each (model, mesh) step is lowered on fake CPU devices and compiled, and
XLA's memory analysis gives the bytes one device needs (arguments + outputs + temporaries
- donated aliases). One subprocess per device count, since the fake-device count is
fixed when JAX starts. This is the evidence that a run fits once the batch and the
parameters are spread over more machines than one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# name -> (mesh, remat). (XLA's CPU memory analysis shows no saving from `--remat`, so
# it is not part of the table: the CPU scheduler is not the accelerators'.)
STRATEGIES = {"data-parallel": ("data:-1", False), "FSDP": ("fsdp:-1", False)}


def measure(model_name: str, mesh_spec: str, batch: int, dtype: str, remat: bool) -> dict:
    """Compile `main.py pretrain`'s step (the job's recipe, setting 3) for the abstract state and batch;
    XLA's per-device memory figures."""
    import jax

    from bench.common import abstract_batch, abstract_job_step, flags_of, pretrain_job
    from semmae_jax import sharding

    mesh = sharding.make_mesh(mesh_spec)
    job = pretrain_job(model_name, *flags_of({"dtype": dtype, "remat": remat, "mesh": mesh_spec, "setting": 3}))
    abstract, step, built = abstract_job_step(job, mesh, batch)
    with jax.set_mesh(mesh):
        compiled = step.lower(abstract, abstract_batch(job, built.model, batch, mesh)).compile()
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    params = sum(x.size for x in jax.tree.leaves(abstract.params))
    return {"model": model_name, "mesh": dict(mesh.shape), "devices": mesh.size, "params": params,
            "state_gib": mem.argument_size_in_bytes / 2**30, "temp_gib": mem.temp_size_in_bytes / 2**30,
            "total_gib": total / 2**30}


def child(args: argparse.Namespace) -> None:
    for name in args.models.split(","):
        for strategy, (spec, remat) in STRATEGIES.items():
            result = measure(name, spec, args.batch, args.dtype, remat)
            print(json.dumps({**result, "strategy": strategy}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14")
    parser.add_argument("--devices", default="8,64,256")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    for count in map(int, args.devices.split(",")):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}", "JAX_PLATFORMS": "cpu"}
        command = [sys.executable, __file__, "--child", "--models", args.models, "--batch", str(args.batch),
                   "--dtype", args.dtype]
        out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(f"global batch {args.batch}, compute {args.dtype}; GiB per device: state (params + optimizer state "
          f"+ batch shard) / total (XLA's estimate: arguments + outputs + temporaries - donated)\n")
    print("| model | devices | " + " | ".join(STRATEGIES) + " |")
    print("|---|---|" + "---|" * len(STRATEGIES))
    for name in args.models.split(","):
        for count in map(int, args.devices.split(",")):
            cells = {r["strategy"]: r for r in rows if r["model"] == name and r["devices"] == count}
            values = [f"{cells[s]['state_gib']:.2f} / {cells[s]['total_gib']:.2f}" for s in STRATEGIES]
            print(f"| {name} | {count} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
