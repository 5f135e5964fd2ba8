"""What a GPU image without TensorFlow needs: the model, masking, sharding, state and step
modules, and the jobs' recipes that `bench/gpu.py` builds its steps from, import without it, and the default XLA GPU flags are added only where they apply and
never over the user's own."""

import os
import subprocess
import sys
from pathlib import Path

from semmae_jax.runtime import distributed
from semmae_jax.runtime.distributed import GPU_XLA_FLAGS, apply_gpu_xla_flags, gpu_expected, with_gpu_xla_flags

REPO = Path(__file__).resolve().parent.parent
STEP_MODULES = ("semmae_jax.models", "semmae_jax.masking", "semmae_jax.sharding", "semmae_jax.train.state",
                "semmae_jax.train.steps", "semmae_jax.train.optim", "semmae_jax.runtime.distributed",
                # the jobs' recipes, which bench/gpu.py times (the input pipeline is imported inside `run`)
                "semmae_jax.train.skeleton", "semmae_jax.jobs.pretrain", "semmae_jax.jobs.finetune", "bench.gpu_jax")
LHS = "--xla_gpu_enable_latency_hiding_scheduler"


def test_step_modules_import_no_tensorflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in STEP_MODULES)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "[]"


def test_defaults_are_added_after_the_users_flags():
    assert with_gpu_xla_flags("") == " ".join(GPU_XLA_FLAGS)
    given = "--xla_force_host_platform_device_count=8"
    assert with_gpu_xla_flags(given) == " ".join([given, *GPU_XLA_FLAGS])


def test_a_flag_the_user_sets_keeps_the_users_value():
    given = f"{LHS}=false --xla_dump_to=/tmp/x"
    assert with_gpu_xla_flags(given) == given


def test_gpu_expected_only_with_a_cuda_plugin_that_is_not_switched_off(monkeypatch):
    assert not gpu_expected({})  # this machine has no jax CUDA plugin
    monkeypatch.setattr(distributed, "_CUDA_PLUGINS", ("json",))  # a module that is installed
    assert gpu_expected({})
    assert gpu_expected({"JAX_PLATFORMS": "cuda,cpu"})
    assert not gpu_expected({"JAX_PLATFORMS": "cpu"})
    assert not gpu_expected({"CUDA_VISIBLE_DEVICES": ""})


def test_apply_sets_xla_flags_only_when_the_backend_will_be_a_gpu(monkeypatch):
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert apply_gpu_xla_flags(environ) == [] and environ == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    monkeypatch.setattr(distributed, "_CUDA_PLUGINS", ("json",))
    assert apply_gpu_xla_flags(environ) == list(GPU_XLA_FLAGS)
    assert environ["XLA_FLAGS"] == " ".join(["--xla_dump_to=/tmp/x", *GPU_XLA_FLAGS])
    assert apply_gpu_xla_flags(environ) == []  # already there: nothing added twice


def test_the_default_flags_are_known_to_this_xla():
    """XLA aborts the process on a flag it does not know, so a misspelt default would kill every GPU job."""
    env = {**os.environ, "XLA_FLAGS": " ".join(GPU_XLA_FLAGS), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3.0"
