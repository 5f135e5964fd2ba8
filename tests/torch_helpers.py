"""Helpers shared by the converter's tests: state dicts as numpy, inputs, JAX runs, bit comparisons,
and tiny randomised transformers models of the test models' shapes."""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
import transformers

from convert.hf_files import read_hf
from convert.safe_load import tensor_to_numpy
from semmae_jax.image_size import height_width

# transformers configs of `mae_vit_test_patch4` / `vit_test_patch4`'s shapes (hub defaults otherwise).
TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                    patch_size=4)  # fmt: skip
TINY_DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                    decoder_intermediate_size=64)  # fmt: skip
HF_CLASSES = ("ViTMAEForPreTraining", "ViTMAEModel", "ViTModel", "ViTForImageClassification")


def numpy_state_dict(module: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, tensor_to_numpy(v)) for k, v in module.state_dict().items())


def images(config: dict, batch: int = 2) -> np.ndarray:
    shape = (batch, *height_width(config["img_size"]), config["in_chans"])
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def masking_noise(config: dict, batch: int = 2) -> np.ndarray:
    rows, columns = (side // config["patch_size"] for side in height_width(config["img_size"]))
    return np.random.default_rng(1).random((batch, rows * columns), dtype=np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def jax_apply(model, params, *args, **kwargs):
    """`model.apply` jitted, in float32 matmul precision; static keywords go in `kwargs`."""
    with jax.default_matmul_precision("float32"):
        out = jax.jit(functools.partial(model.apply, **kwargs))({"params": params}, *args)
    return jax.tree.map(np.asarray, out)


def assert_same_bits(a: dict, b: dict) -> None:
    """Same keys in the same order, and every array the same dtype, shape and bytes."""
    assert list(a) == list(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert x.tobytes() == y.tobytes(), key


def tiny_hf(hf_class: str, *, seed: int = 0, **config) -> torch.nn.Module:
    """A transformers `hf_class` of the test models' shapes with random weights of a real scale
    (`randomize_`: perturbed LayerNorm scales and biases, random tables and tokens)."""
    shapes = {**TINY_ENCODER, **(TINY_DECODER if hf_class.startswith("ViTMAE") else {"num_labels": 10})}
    return random_hf(hf_class, seed, **{**shapes, **config})


def pth_layout(module: torch.nn.Module, directory) -> OrderedDict[str, np.ndarray]:
    """A transformers model's weights in the `.pth` layout: `save_pretrained`, then the converter's reader."""
    module.save_pretrained(directory)
    return read_hf(directory).state_dict


class Payload:
    """Pickles as a call of `function(argument)`: what a malicious checkpoint holds."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    }


def random_hf(hf_class: str, seed: int = 0, **config: Any) -> torch.nn.Module:
    """transformers' `hf_class` (`ViTMAEForPreTraining`, `ViTModel`, ...) with the hub's default
    config but for `config`, and random weights of a real scale (`randomize_`)."""
    config_class = transformers.ViTMAEConfig if hf_class.startswith("ViTMAE") else transformers.ViTConfig
    return randomize_(getattr(transformers, hf_class)(config_class(**config)).eval(), seed)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with non-trivial norms everywhere, for parity checks.

    Freshly initialised models hide errors: zero biases, unit LayerNorm scales and a head
    at std 2e-5 make wrong paths invisible. Here Linear / conv weights are N(0, 1 / fan_in)
    (activations keep their scale through depth), biases N(0, 0.2^2), LayerNorm scales
    1 + N(0, 0.2^2), tokens and position tables N(0, 0.5^2).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(param: torch.Tensor, std: float, mean: float = 0.0) -> None:
        param.normal_(mean, std, generator=gen)

    done = set()
    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            normal_(sub.weight, 0.2, mean=1.0)
        elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            normal_(sub.weight, sub.weight[0].numel() ** -0.5)
        else:
            continue
        if sub.bias is not None:  # `qkv_bias=False` models have none on q, k, v
            normal_(sub.bias, 0.2)
        done |= {id(sub.weight), id(sub.bias)}
    for param in module.parameters():
        if id(param) not in done:
            normal_(param, 0.5)
    return module
