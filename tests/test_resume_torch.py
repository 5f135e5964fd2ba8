"""`pretrain --resume X.pth` with an original training checkpoint: the run continues with the file's AdamW.

The reference is torch's own `AdamW`, built with the original's parameter groups (timm
0.3.2's `add_weight_decay`, sin-cos tables frozen), stepped a few times and saved as MAE's
`misc.save_model` saves; the next update made from the imported state must equal torch's.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import convert
from convert.core import POSITION_TABLES
from convert.reader.adam_continuation import with_adam_moments
from convert.reader.optimizer import torch_adam_state
from convert.safe_load import numpy_to_tensor, tensor_to_numpy
from semmae_jax.cli import main as cli_main
from semmae_jax.models import create_model, frozen_param_names
from semmae_jax.runtime.run_log import epoch_lines
from semmae_jax.train import optim

MODEL, CLASSIFIER, SIZE, LR, EPOCH, LAYER_DECAY = "mae_vit_test_patch4", "vit_test_patch4", 32, 1e-3, 4, 0.75
BETAS = {MODEL: (0.9, 0.95), CLASSIFIER: (0.9, 0.999)}  # the original's pretraining / fine-tuning AdamW


def add_weight_decay(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """timm 0.3.2's `optim_factory.add_weight_decay` with an empty skip list, as MAE's pretraining calls it."""
    decay, no_decay = [], []
    for name, param in named:
        if not param.requires_grad:
            continue
        (no_decay if len(param.shape) == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def param_groups_lrd(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """MAE's `util/lr_decay.param_groups_lrd` (no_weight_decay_list = timm's {pos_embed, cls_token, dist_token}),
    with each group's lr set as `lr_sched.adjust_learning_rate` does: lr x lr_scale."""
    num_layers = 1 + sum(1 for name, _ in named if name.startswith("blocks.") and name.endswith(".norm1.weight"))
    scales = [LAYER_DECAY ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, param in named:
        no_decay = param.ndim == 1 or name in ("pos_embed", "cls_token", "dist_token")
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks"):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = num_layers
        group = groups.setdefault(f"layer_{layer}_{'no_decay' if no_decay else 'decay'}", {
            "lr": LR * scales[layer], "weight_decay": 0.0 if no_decay else weight_decay, "params": []})
        group["params"].append(param)
    return list(groups.values())


def random_grads(named: list[tuple[str, torch.nn.Parameter]], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, param in named:
        param.grad = torch.randn(param.shape, generator=generator) if param.requires_grad else None


class OriginalRun:
    """The torch side: a model's parameters under the original's AdamW and groups, stepped `steps` times.

    Weight decay 0: this project exempts the tokens the original's pretraining decayed (docs/differences.md),
    which would show up as a difference unrelated to the import.
    """

    def __init__(self, name: str = MODEL, steps: int = 3) -> None:
        self.name = name
        model = create_model(name)
        params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"])()
        state_dict = convert.flax_to_torch(jax.tree.map(np.asarray, params), name)
        frozen = POSITION_TABLES if name == MODEL else ()  # MAE's sin-cos tables; a classifier trains pos_embed
        self.named = [(k, torch.nn.Parameter(numpy_to_tensor(v).clone(), requires_grad=k not in frozen))
                      for k, v in state_dict.items()]
        groups = (add_weight_decay if name == MODEL else param_groups_lrd)(self.named, 0.0)
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS[name])
        for seed in range(steps):
            self.step(seed)

    def step(self, seed: int) -> None:
        random_grads(self.named, seed)
        self.optimizer.step()

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        return OrderedDict((k, tensor_to_numpy(p.detach().clone())) for k, p in self.named)

    def grads(self) -> OrderedDict[str, np.ndarray]:
        return OrderedDict((k, tensor_to_numpy(p.grad) if p.grad is not None else np.zeros(p.shape, np.float32))
                           for k, p in self.named)

    def save(self, path, optimizer: dict | None = None) -> None:
        torch.save({"model": OrderedDict((k, p.detach().clone()) for k, p in self.named),
                    "optimizer": optimizer or self.optimizer.state_dict(), "epoch": EPOCH,
                    "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model=self.name, blr=1.5e-4)}, path)


def our_adamw(name: str, params) -> optax.GradientTransformation:
    """This project's optimizer for the job the original ran: frozen tables (MAE) or layer decay (classifier)."""
    model = create_model(name)
    if name == MODEL:
        return optim.adamw(params, lambda count: LR, weight_decay=0.0, betas=BETAS[name],
                           frozen=frozen_param_names(model))
    return optim.adamw(params, lambda count: LR, weight_decay=0.0, betas=BETAS[name],
                       lr_scales=optim.layer_decay_scales(params, model.depth, LAYER_DECAY))


@pytest.mark.parametrize("name", [MODEL, CLASSIFIER])
def test_the_next_update_from_the_imported_state_equals_torchs(tmp_path, name):
    run = OriginalRun(name, steps=3)
    run.save(tmp_path / "checkpoint-4.pth")
    imported = torch_adam_state(tmp_path / "checkpoint-4.pth")
    assert (imported.steps, imported.epoch, imported.betas) == (3, EPOCH, BETAS[name])

    params, _, _ = convert.torch_to_flax(run.state_dict(), name)
    tx = our_adamw(name, params)
    opt_state = with_adam_moments(tx.init(params), imported.mu, imported.nu, imported.steps, updates=3)
    run.step(seed=3)  # torch's 4th update ...
    grads = convert.torch_to_flax(run.grads(), name)[0]
    updates, _ = tx.update(grads, opt_state, params)  # ... and ours, from the same gradient
    ours = jax.tree.map(np.asarray, jax.tree.map(jnp.add, params, updates))
    theirs, _, _ = convert.torch_to_flax(run.state_dict(), name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), theirs, params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the update is not a no-op the comparison would miss
    fresh, _ = tx.update(grads, tx.init(params), params)
    assert not np.allclose(np.asarray(fresh["blocks_0"]["mlp"]["fc1"]["kernel"]),
                           np.asarray(updates["blocks_0"]["mlp"]["fc1"]["kernel"]))  # the moments mattered


def test_an_optimizer_of_other_groups_is_refused_with_the_reason(tmp_path):
    run = OriginalRun(steps=1)
    flat = torch.optim.AdamW([p for _, p in run.named if p.requires_grad], lr=LR)  # one group: not MAE's
    random_grads(run.named, 0)
    flat.step()
    run.save(tmp_path / "other.pth", optimizer=flat.state_dict())
    with pytest.raises(convert.ConversionError, match=r"other\.pth: optimizer: parameter groups of sizes \[\d+\], but"):
        torch_adam_state(tmp_path / "other.pth")


def test_a_file_without_an_optimizer_gives_none(tmp_path):
    convert.save_torch_checkpoint(tmp_path / "weights.pth", OriginalRun(steps=0).state_dict())
    assert torch_adam_state(tmp_path / "weights.pth") is None


@pytest.mark.slow
@pytest.mark.usefixtures("demo_root")
@pytest.mark.parametrize(("job", "name"), [("pretrain", MODEL), ("finetune", CLASSIFIER)])
def test_resume_from_an_original_checkpoint_continues_at_the_next_epoch(tmp_path, capsys, job, name):
    OriginalRun(name, steps=3).save(tmp_path / "checkpoint-4.pth")
    cli_main([job, "--model", name, "--input_size", str(SIZE), "--batch_size", "2", "--steps_per_epoch", "2",
              "--num_workers", "2", "--log_every", "1", "--epochs", str(EPOCH + 2), "--warmup_epochs", "1",
              "--resume", str(tmp_path / "checkpoint-4.pth"), "--output_dir", str(tmp_path / "run")]
             + (["--nb_classes", "10"] if job == "finetune" else []))
    out = capsys.readouterr().out
    assert "params and AdamW state (3 updates), continuing at epoch 5 (step 10)" in out
    epochs = [line["epoch"] for line in epoch_lines(tmp_path / "run")]
    assert epochs == [EPOCH + 1]


def test_moments_of_another_shape_are_refused_naming_the_parameter():
    params = {"pos_embed": jnp.zeros((1, 5, 4)), "head": {"kernel": jnp.zeros((4, 3))}}
    tx = optim.adamw(params, lambda count: LR, weight_decay=0.0, betas=(0.9, 0.999))
    resized = {"pos_embed": np.ones((1, 17, 4)), "head": {"kernel": np.ones((4, 3))}}  # another image size
    with pytest.raises(ValueError, match=r"AdamW moment of \['pos_embed'\] has shape \(1, 17, 4\)"):
        with_adam_moments(tx.init(params), resized, resized, adam_count=3, updates=3)
