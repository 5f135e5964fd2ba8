"""`parity --train`: the three jobs' training agrees with their PyTorch references on the test models,
and each difference injected into the JAX side's recipe makes the harness fail (exit 1)."""

from __future__ import annotations

import re

import optax
import pytest

from convert.parity import sides as train_sides
from convert.parity import training as train_parity  # before anything imports TensorFlow (triton, see conftest)
from semmae_jax import training_length
from semmae_jax.key_paths import map_with_path
from semmae_jax.train import optim

# Flags that make every injected difference visible within a few updates: the peak lr from the
# first update (no warm-up; pretraining: after one), a real weight decay, a cosine that moves every
# update. Accumulation is compared in the probe (the cheapest step to compile).
FINETUNE = ["--train", "finetune", "--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "10",
            "--batch_size", "1", "--updates", "3", "--lr", "3e-3", "--weight_decay", "0.3", "--warmup_epochs", "0",
            "--epochs", "3"]  # fmt: skip
PRETRAIN = ["--train", "pretrain", "--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "1",
            "--updates", "3", "--lr", "3e-3", "--epochs", "3", "--warmup_epochs", "1", "--weight_decay", "0.3",
            "--norm_pix_loss"]  # fmt: skip
LINPROBE = ["--train", "linprobe", "--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "10",
            "--batch_size", "1", "--updates", "3", "--accum_iter", "2", "--lr", "0.5", "--warmup_epochs", "0",
            "--epochs", "3", "--weight_decay", "0.1"]  # fmt: skip


@pytest.fixture(scope="module")
def sides() -> dict:
    """Per recipe, made once: (flags, setup, the clean JAX run, the PyTorch run) - what `compare` does."""
    made = {}

    def get(argv: list[str]) -> tuple:
        key = argv[1]
        if key not in made:
            args, config = train_parity.parse(argv)
            setup = train_parity.prepare(args, train_parity.JOBS[key][1], config)
            ours = train_sides.jax_trajectory(setup)
            made[key] = args, setup, ours, train_sides.torch_trajectory(setup)
        return made[key]

    return get


@pytest.mark.parametrize("argv", [FINETUNE, PRETRAIN, LINPROBE], ids=["finetune", "pretrain", "linprobe"])
def test_recipes_follow_the_pytorch_originals(argv: list[str], sides, capsys: pytest.CaptureFixture) -> None:
    args, setup, ours, theirs = sides(argv)
    assert train_parity.report(ours, theirs, setup.lr, args) == [], capsys.readouterr().out
    assert len(ours.losses) == 3 and max(train_parity.relative(ours.losses, theirs.losses)) < 1e-5  # rounding only
    assert ours.losses[-1] != ours.losses[0]  # it trained


def test_the_ports_difference_is_measured(sides, capsys: pytest.CaptureFixture) -> None:
    """Pretraining's one departure (tokens not decayed) is shown against the original, not hidden."""
    args, setup, _, theirs = sides(PRETRAIN)
    capsys.readouterr()
    train_parity.show_differences(setup, train_parity.JOBS["pretrain"][1], theirs)
    found = re.search(r"difference: cls_token / mask_token .* parameters max (\S+) \((cls|mask)_token", capsys.readouterr().out)
    assert found and float(found.group(1)) > args.param_rtol  # over the tolerance: the flag matters


# Each injection changes the JAX side's recipe (the job code `run.recipe` builds from) in one place.
def decay_a_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    mask = optim.weight_decay_mask  # the blocks' first LayerNorm scales decayed too
    monkeypatch.setattr(optim, "weight_decay_mask", lambda params, *rest: map_with_path(
        lambda path, decayed: decayed or path.endswith("norm1/scale"), mask(params, *rest)))


def other_adam_eps(monkeypatch: pytest.MonkeyPatch) -> None:
    scale_by_adam = optax.scale_by_adam
    monkeypatch.setattr(optax, "scale_by_adam", lambda **kwargs: scale_by_adam(**{**kwargs, "eps": 1e-6}))


def lr_one_update_early(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = training_length.warmup_cosine

    def early(*args: float) -> optax.Schedule:
        return lambda step: schedule(*args)(step + 1)

    monkeypatch.setattr(training_length, "warmup_cosine", early)


def loss_divided_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    accumulate = optim.accumulate
    monkeypatch.setattr(optim, "accumulate", lambda tx, k: accumulate(optax.chain(optax.scale(1.0 / k), tx), k))


def layer_decay_off_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    scales = optim.layer_decay_scales
    monkeypatch.setattr(optim, "layer_decay_scales", lambda params, depth, decay: scales(params, depth + 1, decay))


def trust_ratio_on_biases(monkeypatch: pytest.MonkeyPatch) -> None:
    def lars(params, schedule, *, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        matrices = map_with_path(lambda path, x: x.ndim > 1, params)
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=matrices),
                           optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=0.0),  # unmasked
                           optax.trace(decay=momentum), optax.scale_by_learning_rate(schedule))

    monkeypatch.setattr(optim, "lars", lars)


@pytest.mark.parametrize("argv, inject, caught", [
    (FINETUNE, decay_a_vector, r"blocks\.\d vectors"),
    (FINETUNE, other_adam_eps, r"parameters \("),
    (LINPROBE, lr_one_update_early, r"^lr \("),
    (LINPROBE, loss_divided_twice, r"head vectors"),
    (FINETUNE, layer_decay_off_by_one, r"blocks\.\d matrices"),
], ids=lambda x: getattr(x, "__name__", None) if callable(x) else None)  # fmt: skip
def test_an_injected_difference_fails(argv, inject, caught, sides, monkeypatch) -> None:
    args, setup, _, theirs = sides(argv)
    inject(monkeypatch)
    failed = train_parity.report(train_sides.jax_trajectory(setup), theirs, setup.lr, args)
    assert any(re.search(caught, f) for f in failed), failed


def test_the_command_exits_1_on_a_difference(monkeypatch, capsys) -> None:
    """The whole command (`main.py parity --train linprobe`) with LARS's trust ratio on the bias too."""
    trust_ratio_on_biases(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        train_parity.main(LINPROBE)
    failed = capsys.readouterr().out.strip().splitlines()[-1]
    assert exit_.value.code == 1 and failed.startswith("training parity FAILED") and "head vectors" in failed, failed


def test_bad_flags_end_with_one_line() -> None:
    with pytest.raises(SystemExit, match=r"parity --train finetune: error: .*--dtype float32"):
        train_parity.parse([*FINETUNE, "--dtype", "bfloat16"])
    with pytest.raises(SystemExit, match=r"parity --train finetune: error: unknown model 'vit_nope'"):
        train_parity.main([*FINETUNE, "--model", "vit_nope"])

