"""Test session set-up.

* 8 fake CPU devices, so that sharding tests can build real meshes; set before JAX starts.
* XLA's persistent compilation cache: many tests (and the processes they start) compile
  the same small programs; on 2 cores compiling dominates the suite's time otherwise.
* torchvision is imported before anything imports TensorFlow: triton (loaded by
  torch._dynamo, which torchvision's ops import) crashes the process when its extension
  is loaded after TensorFlow's. Importing it first is the supported order, not a patch.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "semmae_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torchvision  # noqa: E402,F401  (must precede TensorFlow, see above)
