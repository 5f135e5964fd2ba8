"""The bf16 pretraining step saves, per image, at most what PyTorch's whole step held per image on
the H200 (results/gpu.json), counted by the memory account (`bench/memory_account.py`) on abstract
inputs, so nothing is allocated. Each lever that brings it there is held by a check of its own on
the test model, which fails without it; the padded block stack is checked to compute what the
unpadded one does."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from bench.memory_account import Account, account, build_job
from semmae_jax.models import create_model, layers
from semmae_jax.models.layers import REMAT_POLICIES

RESULTS = Path(__file__).resolve().parent.parent / "results" / "gpu.json"
TEST_MODEL = "mae_vit_test_patch4"  # encoder 16 + 1 tokens of 32 (MLP 128), decoder 64 + 1 of 16 (MLP 64)


def pytorch_peak_mib_per_image(model: str) -> float:
    """PyTorch's whole peak (parameters, optimizer, activations) per image in `bench/gpu.py`'s run."""
    rows = [row for row in json.loads(RESULTS.read_text())["rows"]
            if row["name"].startswith("torch ") and row["model"] == model and row.get("peak_gib")]
    assert rows, f"{RESULTS} holds no PyTorch row with a peak for {model}"
    return rows[0]["peak_gib"] * 1024 / rows[0]["batch"]


def dims(shape: str) -> list[str]:
    """'bf16[b,65,4,8]' -> ['b', '65', '4', '8']."""
    return re.fullmatch(r"\w+\[(.*)\]", shape).group(1).split(",")


@functools.cache
def small_account(attention: str = "cudnn", remat: str = "none") -> Account:
    """The test model's bf16 pretraining account (traced once per setting in the session)."""
    return account(build_job("pretrain", TEST_MODEL, attention, "bfloat16", remat))


@pytest.mark.parametrize("model", ["mae_vit_base_patch8", "mae_vit_large_patch16"])
def test_the_bf16_pretraining_step_saves_less_per_image_than_pytorchs_whole_peak(model):
    saved = account(build_job("pretrain", model, "cudnn", "bfloat16"))
    assert saved.remat == "none"
    assert saved.mib_per_image <= pytorch_peak_mib_per_image(model), saved.report(10)


def test_every_residual_of_the_blocks_is_in_the_compute_dtype():
    """LayerNorm recomputes its float32 statistics and normalised values in the backward pass."""
    rows = [row for row in small_account().rows if "Block.__call__" in row.source and row.bytes_per_image]
    assert rows
    assert {row.shape.split("[")[0] for row in rows} == {"bf16"}, [row.shape for row in rows]


def test_each_mlp_keeps_one_hidden_layer_sized_tensor():
    """GELU and fc2 are recomputed from fc1's output: one [L, hidden] tensor per block, not four or five."""
    model = create_model(TEST_MODEL)
    hidden = {str(4 * model.embed_dim), str(4 * model.decoder_embed_dim)}
    kept = sum(row.count for row in small_account().rows
               if len(dims(row.shape)) == 3 and dims(row.shape)[0] == "b" and dims(row.shape)[2] in hidden)
    assert kept == model.depth + model.decoder_depth, small_account().report(20)


def test_xla_attention_keeps_its_weights_once():
    """The [heads, L, L] weights are kept in bfloat16 only, not in float32 for the softmax as well."""
    model = create_model(TEST_MODEL)
    rows = [row for row in small_account("xla").rows
            if len(dims(row.shape)) == 4 and dims(row.shape)[2] == dims(row.shape)[3]]
    assert sum(row.count for row in rows) == model.depth + model.decoder_depth, [row.shape for row in rows]
    assert {row.shape.split("[")[0] for row in rows} == {"bf16"}


def test_cudnn_attention_keeps_only_padded_tensors():
    """The block stack is padded to an even token count once: no block keeps an unpadded (odd) copy
    of its q, k, v or attention output ([b, L, heads, head_dim])."""
    model = create_model(TEST_MODEL)
    heads = {(str(h), str(w // h)) for h, w in ((model.num_heads, model.embed_dim),
                                               (model.decoder_num_heads, model.decoder_embed_dim))}
    lengths = [int(d[1]) for d in map(dims, (row.shape for row in small_account().rows))
               if len(d) == 4 and d[0] == "b" and tuple(d[2:]) in heads]
    assert lengths and all(length % 2 == 0 for length in lengths), lengths


def test_remat_policies_save_less_the_more_they_recompute():
    """Each policy through the jobs' `--remat POLICY` flag (`build_job`); `--remat` alone is 'full'."""
    from semmae_jax.jobs.finetune import parse as finetune_flags
    from semmae_jax.jobs.pretrain import parse as pretrain_flags

    assert pretrain_flags(["--remat"]).remat == finetune_flags(["--remat"]).remat == "full"
    assert pretrain_flags([]).remat == "none"
    figures = [small_account("cudnn", policy).mib_per_image for policy in REMAT_POLICIES]
    assert list(REMAT_POLICIES) == ["none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full"]
    assert figures == sorted(figures, reverse=True) and len(set(figures)) == len(figures), figures


@pytest.mark.parametrize("name", [TEST_MODEL, "vit_test_patch4"])
def test_the_padded_block_stack_computes_what_the_unpadded_one_does(name, monkeypatch):
    """attention='cudnn' with `jax.nn.dot_product_attention`'s 'xla' implementation standing in for
    cuDNN (this CPU has none): the stack padded by one masked token gives attention='xla''s loss and
    gradients."""
    monkeypatch.setattr(layers, "check_attention", lambda *args: None)
    monkeypatch.setattr(layers, "fused_attention", functools.partial(layers.fused_attention, implementation="xla"))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    rngs = {"params": jax.random.key(1), "mask": jax.random.key(2)}
    params = nn.unbox(jax.jit(create_model(name).init)(rngs, images)["params"])

    def loss(attention, params):
        model = create_model(name, attention=attention)
        if name.startswith("mae_"):
            return model.apply({"params": params}, images, rngs=rngs)[0]
        return model.apply({"params": params}, images).sum()

    padded, grads_padded = jax.jit(jax.value_and_grad(functools.partial(loss, "cudnn")))(params)
    plain, grads_plain = jax.jit(jax.value_and_grad(functools.partial(loss, "xla")))(params)
    np.testing.assert_allclose(padded, plain, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_padded, grads_plain)
    model = create_model(name)
    heads, width = ((model.decoder_num_heads, model.decoder_embed_dim) if name.startswith("mae_")
                    else (model.num_heads, model.embed_dim))
    traced = str(jax.make_jaxpr(functools.partial(loss, "cudnn"))(params))
    assert f"66,{heads},{width // heads}]" in traced  # 65 tokens reach the attention as 66: padded
