"""The optimizer tables and schedule against the original's training scripts (reimplemented from SPEC.md)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from semmae_jax.key_paths import flat_by_path
from semmae_jax.train import optim
from semmae_jax.training_length import TrainingLength, warmup_cosine


def _params():
    rng = np.random.default_rng(0)
    shapes = {
        "cls_token": (1, 1, 4), "pos_embed": (1, 5, 4), "patch_embed": {"proj": {"kernel": (2, 2, 3, 4), "bias": (4,)}},
        "blocks_0": {"mlp": {"fc1": {"kernel": (4, 8), "bias": (8,)}}, "norm1": {"scale": (4,), "bias": (4,)}},
        "blocks_1": {"mlp": {"fc1": {"kernel": (4, 8), "bias": (8,)}}},
        "fc_norm": {"scale": (4,), "bias": (4,)}, "head": {"kernel": (4, 3), "bias": (3,)},
    }
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_weight_decay_skips_1d_parameters_tokens_and_position_tables():
    mask = flat_by_path(optim.weight_decay_mask(_params()))
    assert {path for path, decay in mask.items() if decay} == {
        "patch_embed/proj/kernel", "blocks_0/mlp/fc1/kernel", "blocks_1/mlp/fc1/kernel", "head/kernel"}


def _mae_lr(epoch: float, lr: float, min_lr: float, warmup: int, epochs: int) -> float:
    """MAE's util/lr_sched.adjust_learning_rate, as written."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_schedule_equals_maes_per_iteration_schedule():
    steps_per_epoch, warmup, epochs, lr, min_lr = 7, 2, 10, 1e-3, 1e-5
    schedule = warmup_cosine(lr, min_lr, warmup * steps_per_epoch, epochs * steps_per_epoch)
    for step in range(epochs * steps_per_epoch):
        expected = _mae_lr(step / steps_per_epoch, lr, min_lr, warmup, epochs)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10)


def test_training_length_with_accumulation_gives_maes_lr_at_every_update():
    """MAE sets the lr every `accum_iter` micro-batches from the fractional epoch; the run's length
    counts the same updates (one every 3 micro-batches) and gives the same lr at each."""
    length = TrainingLength(epochs=4, steps_per_epoch=6, accum_iter=3, warmup_epochs=1, peak_lr=1e-3, min_lr=1e-5)
    assert (length.total_steps, length.total_updates, length.warmup_updates) == (24, 8, 2)
    for step in range(0, length.total_steps, 3):
        expected = _mae_lr(step / 6, 1e-3, 1e-5, 1, 4)
        assert length.lr_at(step) == pytest.approx(expected, rel=1e-5, abs=1e-10)
        assert length.lr_at(step + 2) == length.lr_at(step)  # the micro-batches of one update share its lr


def _mae_layer_scales(names: list[str], depth: int, decay: float) -> dict[str, float]:
    """MAE's util/lr_decay.param_groups_lrd + get_layer_id_for_vit, on torch-style names."""
    num_layers = depth + 1
    scales = [decay ** (num_layers - i) for i in range(num_layers + 1)]

    def layer_id(name: str) -> int:
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return num_layers

    return {name: scales[layer_id(name)] for name in names}


def test_layer_decay_scales_equal_maes_param_groups_lrd():
    depth, decay = 2, 0.65
    ours = flat_by_path(optim.layer_decay_scales(_params(), depth, decay))
    torch_names = {path: path.replace("/kernel", ".weight").replace("/scale", ".weight").replace("/", ".")
                   .replace("blocks_", "blocks.") for path in ours}
    expected = _mae_layer_scales(list(torch_names.values()), depth, decay)
    for path, name in torch_names.items():
        assert ours[path] == pytest.approx(expected[name]), path


def test_adamw_matches_torch_adamw_with_maes_param_groups():
    """Same grads, same steps: optax chain == torch.optim.AdamW with decay / no-decay groups."""
    params = _params()
    lr, wd, betas, steps = 1e-2, 0.05, (0.9, 0.95), 4
    schedule = warmup_cosine(lr, 0.0, 0, 10**6)
    tx = optim.adamw(params, schedule, weight_decay=wd, betas=betas, frozen=("pos_embed",))
    state = tx.init(params)
    flat = flat_by_path(params)
    decay = flat_by_path(optim.weight_decay_mask(params))
    tensors = {p: torch.tensor(np.asarray(v), requires_grad=True) for p, v in flat.items() if p != "pos_embed"}
    groups = [{"params": [t for p, t in tensors.items() if decay[p]], "weight_decay": wd},
              {"params": [t for p, t in tensors.items() if not decay[p]], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        flat_grads = flat_by_path(grads)
        for path, tensor in tensors.items():
            tensor.grad = torch.from_numpy(np.array(flat_grads[path]))
        torch_opt.step()
    ours = flat_by_path(params)
    for path, tensor in tensors.items():
        np.testing.assert_allclose(ours[path], tensor.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=path)
    np.testing.assert_array_equal(ours["pos_embed"], flat["pos_embed"])  # frozen: untouched


def test_accum_iter_averages_micro_batch_gradients():
    params = {"w": jnp.ones((3, 2))}
    schedule = warmup_cosine(0.1, 0.0, 0, 100)
    plain = optim.adamw(params, schedule, weight_decay=0.0, betas=(0.9, 0.95))
    accum = optim.accumulate(optim.adamw(params, schedule, weight_decay=0.0, betas=(0.9, 0.95)), 2)
    g1, g2 = {"w": jnp.full((3, 2), 1.0)}, {"w": jnp.full((3, 2), 3.0)}
    expected, _ = plain.update({"w": (g1["w"] + g2["w"]) / 2}, plain.init(params), params)
    state = accum.init(params)
    first, state = accum.update(g1, state, params)
    np.testing.assert_array_equal(first["w"], 0.0)  # no update until the last micro-batch
    second, _ = accum.update(g2, state, params)
    np.testing.assert_allclose(second["w"], expected["w"], rtol=1e-6)


def test_param_group_description_names_every_parameter_once():
    params = _params()
    lines = optim.describe_param_groups(params, optim.layer_decay_scales(params, 2, 0.5), frozen=("pos_embed",))
    assert len(lines) == len(jax.tree.leaves(params))
    assert "pos_embed (1, 5, 4) frozen" in lines
    assert "head/kernel (4, 3) wd=on lr_scale=1" in lines
    assert "cls_token (1, 1, 4) wd=off lr_scale=0.125" in lines
