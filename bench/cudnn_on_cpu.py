"""JAX's cuDNN attention checks answered as on an NVIDIA GPU, so that a CPU can trace and lower
the attention='cudnn' path: the memory account counts its saved activations, and the tests lower
its training steps for CUDA.

`jax.nn.dot_product_attention(implementation='cudnn')` asks the local GPU for its cuDNN version
and compute capability while it is traced, and the model's own `check_attention` asks JAX's
first device; on a CPU every answer is a refusal. Inside `cudnn_as_on(device)` they answer as
`device` would (cuDNN 9.14, the version the H200 run had), and nothing else changes: what the
trace builds is what that GPU would build, and it can be lowered with
`lowering_platforms=('cuda',)` but not compiled or run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from unittest import mock

H200 = SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200")
H100 = SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H100")
CUDNN_VERSION = 91400  # cuDNN 9.14


def _capability(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(text).split("."))


@contextlib.contextmanager
def cudnn_as_on(device: Any = H200) -> Iterator[None]:
    """Within the block, JAX's cuDNN checks and `layers.check_attention` answer as `device` does."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks

    from semmae_jax.models import layers

    capability = _capability(device.compute_capability)
    check = layers.check_attention
    with (mock.patch.object(cudnn_checks, "check_cudnn_version", lambda: CUDNN_VERSION),
          mock.patch.object(cudnn_checks, "check_compute_capability", lambda c: capability >= _capability(c)),
          mock.patch.object(cudnn_checks, "is_cuda_compute_capability_equal", lambda c: capability == _capability(c)),
          mock.patch.object(layers, "check_attention",
                            lambda implementation, dtype, head_dim, _=None: check(implementation, dtype, head_dim,
                                                                                  device))):
        yield
