"""Model FLOPs and model FLOP utilisation (MFU): one count for the jobs' logs and the benchmarks.

Model FLOPs are counted analytically from the model's shape, so that a training job's log,
`bench/gpu.py` and `bench/input.py` give the same figure for the same step: matrix products
only, 2 FLOPs per multiply-add, forward x 3 for forward + backward. Norms, softmax, the
optimizer update and recomputation (remat) are not counted: MFU measures the model's work
done per second against the device's peak, not the hardware's busy time. The count is
checked against the matrix products of the models' own jaxprs (tests/test_flops.py).

MFU = model FLOPs of a step / step time / (peak FLOP/s per device x devices). The peak is
the device's dense bf16 matrix peak from `PEAKS`, or what the user states (`--peak_tflops`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import flax.linen as nn

FLOPS_NOTE = ("model FLOPs per image = 3 x forward matmul FLOPs (2 per multiply-add): per block "
              "(8 + 4 mlp_ratio) n d^2 + 4 n^2 d for n tokens of width d; MAE encoder n = 1 + int(L (1 - mask_ratio)), "
              "decoder n = 1 + L, plus patch embedding 2 L p^2 C d, decoder embed and pixel head; "
              "the classifier n = 1 + L plus its head; optimizer, norms, softmax not counted")

# Dense (no 2:4 sparsity) bf16 matrix peaks per device, TFLOP/s; first matching pattern of
# `jax.Device.device_kind` wins. NVIDIA's pages print the sparse figure (marked *): halved here.
#   H100 SXM 1,979* / PCIe 1,513*: https://www.nvidia.com/en-us/data-center/h100/
#   H200 1,979*: https://www.nvidia.com/en-us/data-center/h200/
#   A100 312 (624*): https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   L4 242*: https://www.nvidia.com/en-us/data-center/l4/
#   TPU "peak compute per chip (bf16)": v4 275 https://cloud.google.com/tpu/docs/v4,
#   v5e 197 https://cloud.google.com/tpu/docs/v5e, v5p 459 https://cloud.google.com/tpu/docs/v5p,
#   v6e 918 https://cloud.google.com/tpu/docs/v6e (JAX names v5e "TPU v5 lite", v6e "TPU v6 lite").
PEAKS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100|H200|GH200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
    (r"TPU v4", 275.0),
    (r"TPU v5 ?lite|TPU v5e", 197.0),
    (r"TPU v5p?$", 459.0),
    (r"TPU v6 ?lite|TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None when `PEAKS` does not know it (CPUs among them)."""
    return next((peak for pattern, peak in PEAKS if re.search(pattern, device_kind)), None)


def mfu(flops_per_step: float, step_seconds: float, peak_tflops_per_device: float, devices: int) -> float:
    """Model FLOP utilisation: the step's model FLOP/s over the peak of all the devices that ran it."""
    return flops_per_step / step_seconds / (peak_tflops_per_device * 1e12 * devices)


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of one block: qkv 6nd^2, scores and weighted sum 4n^2d, proj 2nd^2, MLP 4r nd^2."""
    return (8 + 4 * mlp_ratio) * tokens * width**2 + 4 * tokens**2 * width


def forward_flops(model: nn.Module, mask_ratio: float = 0.75, tokens: int | None = None) -> float:
    """Forward matmul FLOPs of one image through an MAE (`mask_ratio` of the patches dropped; of
    `tokens` patches when it sees a subset, `--labelled_tokens`) or a ViT."""
    pixels = model.patch_size**2 * model.in_chans
    forward = 2 * model.num_patches * pixels * model.embed_dim  # every patch embedded, then the masked ones dropped
    patches = tokens or model.num_patches
    if hasattr(model, "decoder_depth"):
        encoder, decoder = 1 + int(patches * (1 - mask_ratio)), 1 + patches
        forward += model.depth * block_flops(encoder, model.embed_dim, model.mlp_ratio)
        forward += 2 * encoder * model.embed_dim * model.decoder_embed_dim
        forward += model.decoder_depth * block_flops(decoder, model.decoder_embed_dim, model.mlp_ratio)
        return forward + 2 * decoder * model.decoder_embed_dim * pixels
    return forward + model.depth * block_flops(1 + patches, model.embed_dim, model.mlp_ratio) + head_flops(
        model.embed_dim, model.num_classes)


def head_flops(width: int, classes: int) -> float:
    """Forward FLOPs of a linear classifier on one `width` feature vector."""
    return 2 * width * classes


def train_flops(model: nn.Module, mask_ratio: float = 0.75, tokens: int | None = None) -> float:
    """Model FLOPs of one image's training step: forward + backward = 3 x forward."""
    return 3.0 * forward_flops(model, mask_ratio, tokens)
