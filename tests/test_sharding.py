"""Meshes, the parameter placement table, and mesh-equivalence of the pretraining step
(8 fake CPU devices, set in conftest.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from semmae_jax import sharding
from semmae_jax.jobs.pretrain import PretrainJob, parse
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.train.skeleton import build_recipe, fresh_state, jitted_step

MESHES = {"one device": None, "data 8": "data:8", "data 4 x fsdp 2": "data:4,fsdp:2", "2 x 2 x 2": "data:2,fsdp:2,tensor:2"}


def test_eight_fake_devices_are_there():
    assert jax.device_count() == 8


def test_mesh_flag_parsing_and_sizes():
    assert sharding.parse_mesh("data:-1,fsdp:2") == {"data": -1, "fsdp": 2, "tensor": 1}
    mesh = sharding.make_mesh("data:-1,tensor:2")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data:3", "needs 3 devices, but 8 are available"),
        ("data:-1,fsdp:3", "do not divide the 8 devices"),
        ("data:-1,fsdp:-1", "at most one axis may be -1"),
        ("model:2", "bad entry 'model:2'"),
        ("data:two", "must be an integer"),
    ],
)
def test_bad_meshes_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(spec)


def test_a_batch_the_mesh_cannot_split_is_a_clear_error():
    mesh = sharding.make_mesh("data:4,fsdp:2")
    sharding.check_global_batch(16, mesh)
    with pytest.raises(ValueError, match="global batch of 12 is not divisible by the 8 batch shards"):
        sharding.check_global_batch(12, mesh)


def test_every_parameter_needs_a_rule():
    mesh = sharding.make_mesh("data:8")
    with pytest.raises(ValueError, match=r"no rule in sharding\.PARAM_RULES places parameter .blocks_0/gamma."):
        sharding.param_spec("blocks_0/gamma", (4,), None, mesh)


def _state(model_name: str, mesh_spec: str | None, batch: int = 8):
    """`main.py pretrain`'s fresh state, optimizer and jitted step (setting 3, lr 1e-3 from the first
    update), built by its recipe, on `mesh_spec` (None: one device)."""
    job = PretrainJob(parse(["--model", model_name, "--input_size", "32", "--lr", "1e-3", "--warmup_epochs", "0",
                             "--setting", "3"]))
    mesh = sharding.make_mesh(mesh_spec or "data:1", devices=None if mesh_spec else jax.devices()[:1])
    built = build_recipe(job, job.build_model(), BatchGeometry.from_flags(0, batch, devices=mesh.size), 10, mesh)
    with jax.set_mesh(mesh):
        state, tx = fresh_state(job, built)
    return built, state, jitted_step(job, built, tx, built.shardings)


def test_parameters_and_adam_moments_are_placed_as_the_rules_say():
    state = _state("mae_vit_test_patch4", "data:2,fsdp:2,tensor:2")[1]
    block = state.params["blocks_0"]
    expected = {
        # [embed 32, 3, heads 4, head_dim 8]: heads over tensor, then the largest free dim over fsdp.
        ("attn", "qkv", "kernel"): (P("fsdp", None, "tensor", None), (16, 3, 2, 8)),
        ("attn", "qkv", "bias"): (P(None, "tensor", None), (3, 2, 8)),
        ("attn", "proj", "kernel"): (P("tensor", None, "fsdp"), (2, 8, 16)),
        ("mlp", "fc1", "kernel"): (P("fsdp", "tensor"), (16, 64)),
        ("mlp", "fc2", "kernel"): (P("tensor", "fsdp"), (64, 16)),
        ("norm1", "scale"): (P(None), (32,)),
    }
    for path, (spec, shard_shape) in expected.items():
        leaf = block
        for name in path:
            leaf = leaf[name]
        assert leaf.sharding.spec == spec, path
        assert leaf.addressable_shards[0].data.shape == shard_shape, path
    for name in ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed"):
        assert state.params[name].sharding.spec == P()
    # Adam's moments live where their parameters live; the frozen tables have none.
    mu = state.opt_state.inner_states["train"].inner_state[0].mu
    assert mu["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert not jax.tree.leaves(mu["pos_embed"])


def _losses(mesh_spec: str | None, steps: int = 3) -> list[float]:
    built, state, step = _state("mae_vit_test_patch4", mesh_spec)
    mesh = built.mesh
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(-1, 4, (8, 64)).astype(np.int32)
    losses = []
    with jax.set_mesh(mesh):
        batch = jax.device_put({"image": images, "part_labels": labels}, sharding.batch_sharding(mesh))
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


def test_first_steps_give_the_same_losses_on_every_mesh():
    reference = _losses(None)
    assert reference[-1] < reference[0]  # it trains
    for name, spec in MESHES.items():
        if spec is not None:
            np.testing.assert_allclose(_losses(spec), reference, rtol=2e-5, err_msg=name)


def test_a_tensor_axis_that_does_not_divide_the_heads_is_an_error_naming_the_parameter():
    mesh = sharding.make_mesh("data:1,fsdp:1,tensor:8")
    with pytest.raises(ValueError, match=r"the tensor axis of 8 does not divide dimension 2 \('heads', size 4\) "
                                         r"of parameter blocks_0/attn/qkv/kernel"):
        sharding.param_spec("blocks_0/attn/qkv/kernel", (32, 3, 4, 8), P("embed", None, "heads", "kv"), mesh)
    spec = sharding.param_spec("blocks_0/attn/qkv/kernel", (32, 3, 8, 8), P("embed", None, "heads", "kv"), mesh)
    assert spec == P(None, None, "tensor", None)
