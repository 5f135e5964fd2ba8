"""Stage 1 of SemMAE: learn semantic parts on a frozen ViT, export them, look at them, score them.

    python main.py parts train  --backbone CKPT [--data_path DIR] [--num_parts N] --output_dir OUT
    python main.py parts export --checkpoint OUT [--data_path DIR] --out PART_DIR
    python main.py parts show   --checkpoint OUT [--data_path DIR] [--out parts.png]
    python main.py parts eval   --checkpoint OUT [--data_path DIR --part_path TRUE_PARTS]

Without `--data_path` every command uses the demo data (whose true part maps `eval` and
`show` read). `train` is sharded like pretraining (the same mesh flags, orbax checkpoints
with resume, TensorBoard, progress); the backbone (any checkpoint the converter reads:
this project's MAE, MAE / DINO / iBOT releases and training files) is frozen and saved
with the learner, so a run's checkpoint is all that `export`, `show` and `eval` need.

Geometry: every command feeds the backbone the *whole* image resized to its input size
(no crop), so a part map covers its image exactly. `export` writes it at the patch grid
(or `--map_scale` times finer), and the pretraining pipeline warps it with the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from semmae_jax import config as config_lib
from semmae_jax import distributed, sharding, visualize
from semmae_jax.checkpoint import RunCheckpoints, abstract_like
from semmae_jax.config import field
from semmae_jax.data.part_maps import NO_PART, part_map_path, patch_vote, read_part_map, write_part_map
from semmae_jax.metrics_log import RunLog
from semmae_jax.parts import (
    LossWeights,
    PartLearner,
    PartModel,
    assign_parts,
    attention_parts,
    backbone_model,
    fit_kmeans,
    frozen_backbone,
    kmeans_parts,
    last_cls_attention,
    part_losses,
    part_scores,
)
from semmae_jax.train import optim
from semmae_jax.train.flags import DataFlags, RunFlags, ScheduleFlags
from semmae_jax.train.loop import Schedule, Trainer, resume
from semmae_jax.train.state import TrainState, create_state
from semmae_jax.train.steps import jit_step

# (path, input size or None for the checkpoint's own) -> (encoder params, model name, overrides)
BackboneLoader = Callable[[str, int | None], tuple[Any, str, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class PartsConfig(RunFlags, DataFlags, ScheduleFlags):
    """`parts train` flags (with the shared run, data and schedule flags); `configs/parts_*.py` presets."""

    # Backbone and learner.
    backbone: str | None = field(None, "frozen ViT: a .pth (MAE, DINO, iBOT) or an orbax checkpoint / run directory")
    input_size: int | None = field(None, "backbone input size (default: the checkpoint's; else the position table is resampled)")
    num_parts: int = field(6, "N, the number of parts (ids 0..N-1)")
    background: bool = field(False, "add a background part (exported as 'no part', 255)")
    blur_sigma: float = field(0.5, "Gaussian blur of the part maps, in patches (0: none)")
    decoder_width: int = field(64, "channels of the decoder's first block (halved at each upsampling)")
    decoder_upsamples: int = field(2, "x2 upsamplings of the decoder: it reconstructs at grid * 2**this")
    # Loss weights (0 turns a term off).
    pixel_weight: float = field(0.05, "image reconstruction (MSE) from the part maps")
    feature_weight: float = field(0.0, "frozen-backbone tokens of the reconstruction vs the image's")
    token_weight: float = field(1.0, "backbone patch tokens rebuilt from the part maps")
    diversity_weight: float = field(0.05, "diversity: overlap between the maps")
    foreground_weight: float = field(0.07, "with --background: cost of the part maps' area")
    hflip: float = field(0.5, "probability of a horizontal flip")
    vis_every: int = field(10, "picture of the parts every N epochs (and at the end)")
    # Shared flags with other defaults (AdamW, lr = blr x batch / 256: 1e-3 at batch 64).
    epochs: int = field(100)
    warmup_epochs: int = field(5)
    blr: float = field(4e-3)
    num_workers: int = field(8)
    output_dir: str = field("./output_parts")
    resume: str = field("auto", "'auto' (this run's latest checkpoint) or another parts run directory")
    save_every: int = field(10)

    def loss_weights(self) -> LossWeights:
        return LossWeights(pixels=self.pixel_weight, features=self.feature_weight, tokens=self.token_weight,
                           diversity=self.diversity_weight,
                           foreground=self.foreground_weight if self.background else 0.0)


# ------------------------------------------------------------------------------ model


def part_model(config: PartsConfig, backbone_name: str, backbone_overrides: dict[str, Any]) -> PartModel:
    """The frozen backbone + learner that `config` describes."""
    learner = PartLearner(num_parts=config.num_parts, background=config.background, blur_sigma=config.blur_sigma,
                          decoder_width=config.decoder_width, decoder_upsamples=config.decoder_upsamples)
    return PartModel(backbone_model(backbone_name, backbone_overrides), learner, feature_loss=config.feature_weight > 0)


def make_parts_step(model: PartModel, tx: optax.GradientTransformation, weights: LossWeights, background: bool) -> Callable:
    """`step(state, batch, unused) -> (state, metrics)`: the losses, their gradient (backbone frozen), AdamW."""

    def step(state: TrainState, batch: dict[str, jax.Array], _: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            outputs = model.apply({"params": frozen_backbone(params)}, batch["image"])
            return part_losses(outputs, batch["image"], weights, background)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step


# ------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class WholeImageTransform:
    """The whole image resized to the backbone's input (no crop), optional flip.

    Returns {'image': uint8 [S, S, 3] (the pipeline normalises batches), 'part_labels':
    int32 [L]} (all -1 without a part map), the map warped with the image, so a part
    map's pixels stay on their image's.
    """

    img_size: int
    patch_size: int
    hflip: float = 0.0

    def __call__(self, raw: dict[str, Any], seed: Any) -> dict[str, Any]:
        import tensorflow as tf

        from semmae_jax.data import transforms as T

        image = T.decode_full(raw)
        size = tf.shape(image)[:2]
        flip = tf.random.stateless_uniform([], seed) < self.hflip
        image = T.resize(image, (self.img_size, self.img_size), "bicubic")
        image = tf.gather(image, T.flip_columns(self.img_size, flip), axis=1)
        window = tf.concat([[0, 0], size], axis=0)

        def vote() -> tf.Tensor:
            warped = T.warp_part_map(tf.io.decode_png(raw["part"], channels=1)[..., 0], window, size, self.img_size, flip)
            return T.patch_vote(tf.ensure_shape(warped, [self.img_size, self.img_size]), self.patch_size)

        num_patches = (self.img_size // self.patch_size) ** 2
        labels = tf.cond(tf.strings.length(raw["part"]) > 0, vote, lambda: tf.fill([num_patches], -1))
        return {"image": image, "part_labels": labels}


def default_data(data_path: str | None, part_path: str | None = None) -> tuple[str, str | None]:
    """(data_path, part_path): the demo's, with its true part maps, when no data is named."""
    if data_path:
        return data_path, part_path
    from semmae_jax.data import demo_data

    root = demo_data()
    return str(root), part_path or str(root / "parts")


def true_labels(part_file: str, img_size: int, patch_size: int) -> np.ndarray:
    """A true part map as the model's patches see it: resized (nearest) to the input, majority per patch.

    PIL's nearest resize samples at pixel centres, as the pipeline's `warp_part_map` does
    for a whole-image window. Returns [L] int32, -1 for "no part" (and without a file).
    """
    from PIL import Image

    if not part_file:
        return np.full((img_size // patch_size) ** 2, -1, np.int32)
    resized = Image.fromarray(read_part_map(part_file)).resize((img_size, img_size), Image.Resampling.NEAREST)
    return patch_vote(np.asarray(resized), patch_size)


# ------------------------------------------------------------------------------ train


def parse_train(argv: Sequence[str]) -> PartsConfig:
    config = config_lib.parse_job_config(argv, PartsConfig, "main.py parts train", __doc__)
    if not config.backbone:
        raise SystemExit("main.py parts train: error: --backbone is required (a .pth or an orbax checkpoint of a ViT / MAE)")
    return config


def train(config: PartsConfig, load_backbone: BackboneLoader) -> TrainState:
    """The part-learning job, phase by phase (as `pretrain.run`); returns the final state."""
    config.start_runtime()
    backbone_params, name, overrides = load_backbone(config.backbone, config.input_size)  # torch before TensorFlow
    from semmae_jax import data  # TensorFlow starts here, after jax.distributed

    mesh = sharding.make_mesh(config.mesh)
    log = RunLog(config.output_dir, config.log_dir)
    model = part_model(config, name, overrides)
    size, patch = model.backbone.img_size, model.backbone.patch_size
    global_batch = config.batch_size * jax.device_count()
    sharding.check_global_batch(global_batch, mesh)
    source = data.open_source(config.resolved_data_path(), "train", dataset=config.dataset,
                              tfds_data_dir=config.tfds_data_dir)
    loader = data.TrainLoader(source, batch_size=global_batch // jax.process_count(), seed=config.seed,
                              transform=WholeImageTransform(size, patch, config.hflip), num_workers=config.num_workers)
    schedule = Schedule(epochs=config.epochs, steps_per_epoch=min(loader.steps_per_epoch, config.steps_per_epoch or 10**12),
                        save_every=config.save_every, save_every_steps=config.save_every_steps,
                        log_every=config.log_every)
    lr, eff_batch = config.learning_rate(global_batch)
    lr_schedule = optim.warmup_cosine(lr, config.min_lr, config.warmup_epochs * schedule.steps_per_epoch // config.accum_iter,
                                      schedule.total_steps // config.accum_iter)
    log.print(f"backbone {config.backbone}: {name} {overrides} at {size}x{size} ({size // patch}x{size // patch} "
              f"patches), frozen; {config.num_parts} parts{' + background' if config.background else ''}; "
              f"effective batch {eff_batch}, lr {lr:.2e}, {schedule.steps_per_epoch} steps per epoch, {config.epochs} epochs")

    def make_tx(params: Any) -> optax.GradientTransformation:
        return optim.adamw(params, lr_schedule, weight_decay=config.weight_decay, betas=(0.9, 0.999),
                           frozen=("backbone",), accum_iter=config.accum_iter)

    example = (jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),)
    with jax.set_mesh(mesh):
        state, shardings, tx = create_state(model, make_tx, example, mesh, config.seed)
        state = state.replace(params={**state.params, "backbone": _place(backbone_params, state.params["backbone"])})
        checkpoints = RunCheckpoints(config.checkpoint_dir, max_to_keep=config.keep_checkpoints)
        state = resume(state, abstract_like(state), checkpoints, config.resume, None, log)
        step = jit_step(make_parts_step(model, tx, config.loss_weights(), config.background), shardings,
                        sharding.batch_sharding(mesh), mesh)
        run_config = {"job": "parts", **dataclasses.asdict(config), "backbone_model": name,
                      "backbone_overrides": overrides}
        trainer = Trainer(step_fn=step, epoch_batches=loader.epoch_batches, mesh=mesh, schedule=schedule,
                          lr_at=lambda s: float(lr_schedule(s // config.accum_iter)), checkpoints=checkpoints, config=run_config, log=log,
                          images_per_step=global_batch, on_epoch_end=_picture_hook(model, config, log, mesh))
        state = trainer.run(state)
    checkpoints.close()
    log.close()
    return state


def _place(params: Any, like: Any) -> Any:
    """The loaded backbone params where (and as) the initialised ones are; a clear error if they do not fit."""
    shapes = jax.tree.map(np.shape, params)
    if shapes != jax.tree.map(np.shape, like):
        raise ValueError(f"the backbone's params do not fit its model: {shapes} vs {jax.tree.map(np.shape, like)}")
    return jax.device_put(params, jax.tree.map(lambda x: x.sharding, like))


def _picture_hook(model: PartModel, config: PartsConfig, log: RunLog, mesh: jax.sharding.Mesh) -> Callable:
    """Every `vis_every` epochs and at the end: images with their parts overlaid."""

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    @sharding.with_logical_rules
    def parts_of(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return images[:8], assign_parts(model.apply({"params": params}, images[:8]).maps, config.background)

    def hook(epoch: int, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, float]:
        if (epoch + 1) % config.vis_every and epoch + 1 != config.epochs:
            return {}
        images, labels = (np.asarray(jax.device_get(x)) for x in parts_of(state.params, batch["image"]))
        if log.enabled:
            panel = parts_panel(images, [labels.reshape(len(labels), -1)])
            visualize.save_png(log.output_dir / f"parts_epoch{epoch:04d}.png", panel)
            log.image(int(state.step), "parts", panel)
        return {}

    return hook


# --------------------------------------------------------------------- a trained run


@dataclasses.dataclass(frozen=True)
class PartsRun:
    """A trained part model read back from its checkpoint: everything export / show / eval need."""

    model: PartModel
    params: Any
    config: dict[str, Any]

    @property
    def background(self) -> bool:
        return bool(self.config["background"])

    @property
    def img_size(self) -> int:
        return self.model.backbone.img_size

    @property
    def patch_size(self) -> int:
        return self.model.backbone.patch_size

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def load_run(path: str) -> PartsRun:
    """The latest checkpoint of a `parts train` run (its output dir or its `checkpoints/`)."""
    from semmae_jax.checkpoint import load_params

    root = Path(path)
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not directory.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such run directory")
    checkpoints = RunCheckpoints(directory, async_save=False)
    step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"--checkpoint {path}: no checkpoint in {directory}")
    config = checkpoints.restore(step, {}, ("config",))[1]["config"]
    checkpoints.close()
    if config.get("job") != "parts":
        raise ValueError(f"--checkpoint {path}: a {config.get('job')!r} run, not a parts run")
    params, _ = load_params(directory / str(step))
    known = {f.name for f in dataclasses.fields(PartsConfig)}
    parts_config = PartsConfig(**{k: v for k, v in config.items() if k in known})
    return PartsRun(part_model(parts_config, config["backbone_model"], config["backbone_overrides"]), params, config)


def local_mesh() -> jax.sharding.Mesh:
    """This process's devices, for commands where every process works on its own images."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))


def run_batches(run: PartsRun, source: Any, batch_size: int, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's evaluation batches of `source` (whole images at the backbone's size), in listing order."""
    from semmae_jax import data

    loader = data.EvalLoader(source, batch_size=batch_size, transform=WholeImageTransform(run.img_size, run.patch_size),
                             num_workers=num_workers, process_index=0, process_count=1)
    return loader.batches()


def predictor(run: PartsRun, mesh: jax.sharding.Mesh, fn: Callable[[Any, Any], Any]) -> Callable[[np.ndarray], Any]:
    """`images -> fn(outputs, intermediates)` jitted on `mesh` (batch split over it), fetched to numpy."""
    params = jax.device_put(run.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @jax.jit
    def apply(params: Any, images: jax.Array) -> Any:
        outputs, state = run.model.apply({"params": params}, images, mutable=["intermediates"])
        return fn(outputs, state["intermediates"])

    return lambda images: jax.tree.map(np.asarray, apply(params, jax.device_put(images, batch)))


# ----------------------------------------------------------------------------- export


def parse_export(argv: Sequence[str]) -> argparse.Namespace:
    parser = _run_parser("export", "write one PNG part map per image (resumable, one shard per process)")
    parser.add_argument("--out", required=True, help="root of the part-map tree (mirrors --data_path)")
    parser.add_argument("--split", default="train", help="the image folder's split to export")
    parser.add_argument("--map_scale", type=int, default=1, help="maps at the patch grid times this (bilinear)")
    parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    parser.add_argument("--num_processes", type=int, default=None, help="number of processes")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> dict[str, int]:
    """Part maps of this process's share of the split, skipping maps already written. Returns the counts."""
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from semmae_jax.data import image_folder
    from semmae_jax.data.sources import Shard, eval_share

    run = load_run(args.checkpoint)
    data_path, _ = default_data(args.data_path)
    source = image_folder(data_path, args.split)
    start, stop = eval_share(source.num_examples, Shard(jax.process_index(), jax.process_count()))
    targets = [part_map_path(args.out, data_path, p) for p in source.paths[start:stop]]
    pending = np.asarray([i for i, t in enumerate(targets, start) if not t.exists()], np.int64)
    counts = {"images": stop - start, "existing": stop - start - len(pending), "written": 0, "unreadable": 0}
    if len(pending):
        subset = dataclasses.replace(source, paths=source.paths[pending], labels=source.labels[pending],
                                     part_paths=source.part_paths[pending])
        _write_maps(run, subset, data_path, args, counts)
    print(f"process {jax.process_index()}: {counts['images']} images in its share: {counts['written']} part maps "
          f"written, {counts['existing']} already there, {counts['unreadable']} unreadable; in {args.out}", flush=True)
    return counts


def _write_maps(run: PartsRun, subset: Any, data_path: str, args: argparse.Namespace, counts: dict[str, int]) -> None:
    """Predict and write the maps of `subset`, counting what was written."""
    mesh = local_mesh()
    predict = predictor(run, mesh, lambda out, _: assign_parts(out.maps, run.background, args.map_scale))
    batch_size = _multiple(args.batch_size, mesh.size)
    batches = run_batches(run, subset, batch_size, args.num_workers)
    first = 0
    for batch in tqdm(batches, total=-(-subset.num_examples // batch_size), desc="export",
                      disable=not distributed.is_primary(), dynamic_ncols=True):
        ids = predict(batch["image"])
        for row in np.flatnonzero(batch["mask"]):
            _write_atomic(part_map_path(args.out, data_path, subset.paths[first + row]),
                          np.where(ids[row] < 0, NO_PART, ids[row]))
        counts["written"] += int(batch["mask"].sum())
        first += len(batch["mask"])
    counts["unreadable"] = subset.num_examples - counts["written"]


def _write_atomic(path: Path, labels: np.ndarray) -> None:
    """Write then rename, so an interrupted export never leaves a truncated map that resume would skip."""
    partial = path.with_name(path.stem + ".partial.png")
    write_part_map(partial, labels)
    partial.replace(path)


def _multiple(batch_size: int, ways: int) -> int:
    return -(-batch_size // ways) * ways


# ------------------------------------------------------------------------ show / eval


def _run_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"main.py parts {name}", description=description)
    parser.add_argument("--checkpoint", required=True, help="a parts train --output_dir (or its checkpoints/)")
    parser.add_argument("--data_path", default=None, help="image folder root (default: the demo data)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=8)
    return parser


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 image [H, W, 3] with per-patch part ids [L] painted over it (-1: left as is)."""
    grid = int(np.sqrt(labels.size))
    colours = visualize.part_colours(labels, (grid, grid), image.shape[:2]).astype(np.float32)
    painted = np.repeat(np.repeat(labels.reshape(grid, grid) >= 0, image.shape[0] // grid, 0), image.shape[1] // grid, 1)
    blend = np.where(painted[..., None], (1 - alpha) * image + alpha * colours, image)
    return blend.astype(np.uint8)


def parts_panel(images: np.ndarray, label_sets: Sequence[np.ndarray], min_size: int = 128) -> np.ndarray:
    """One row per image: the image, then each set of per-patch labels [N, L] overlaid on it."""
    rows = [visualize.panel_row([image] + [overlay(image, labels[i]) for labels in label_sets], min_size)
            for i, image in enumerate(visualize.to_uint8(images))]
    return np.concatenate(rows, axis=0)


def show(args: argparse.Namespace) -> Path:
    """A PNG of the first images of the split: image | learned parts | true parts (when there are)."""
    from semmae_jax.data import image_folder

    run = load_run(args.checkpoint)
    data_path, part_path = default_data(args.data_path, args.part_path)
    source = image_folder(data_path, args.split, part_path, missing_parts="unlabelled")
    ids = np.linspace(0, source.num_examples - 1, min(args.num_images, source.num_examples)).astype(np.int64)
    subset = dataclasses.replace(source, paths=source.paths[ids], labels=source.labels[ids], part_paths=source.part_paths[ids])
    predict = predictor(run, local_mesh(), lambda out, _: assign_parts(out.maps, run.background))
    batch = next(run_batches(run, subset, _multiple(len(ids), jax.local_device_count()), args.num_workers))
    learned = predict(batch["image"]).reshape(len(batch["image"]), -1)
    truth = np.stack([true_labels(p, run.img_size, run.patch_size) for p in subset.part_paths])
    label_sets = [learned[: len(ids)]] + ([truth] if (truth >= 0).any() else [])
    out = Path(args.out or Path(args.checkpoint) / f"parts_{args.split}.png")
    visualize.save_png(out, parts_panel(batch["image"][: len(ids)], label_sets))
    print(f"wrote {out}: {len(ids)} images of {data_path} ({args.split}): image | learned parts"
          + (" | true parts" if len(label_sets) > 1 else ""))
    return out


def collect(run: PartsRun, source: Any, batch_size: int, num_workers: int) -> dict[str, np.ndarray]:
    """Learned part ids (the background is id N), patch tokens and last cls attention of every image.

    Each array has one row per image of `source`, in order; 'read' is False for an image
    the pipeline could not read (its other rows are blank).
    """
    depth = run.model.backbone.depth

    def outputs(out: Any, intermediates: Any) -> dict[str, jax.Array]:
        return {"learned": jnp.argmax(out.maps, axis=1).reshape(out.maps.shape[0], -1), "tokens": out.patches,
                "attention": last_cls_attention(intermediates["backbone"], depth)}

    mesh = local_mesh()
    predict = predictor(run, mesh, outputs)
    parts = [{**predict(b["image"]), "read": b["mask"]}
             for b in run_batches(run, source, _multiple(batch_size, mesh.size), num_workers)]
    return {name: np.concatenate([p[name] for p in parts])[: source.num_examples] for name in parts[0]}


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """mIoU / ARI of the learned parts and of the baselines against the true part maps."""
    from semmae_jax.data import image_folder

    run = load_run(args.checkpoint)
    data_path, part_path = default_data(args.data_path, args.part_path)
    if part_path is None:
        raise ValueError("eval needs the true part maps: --part_path (a part-map tree mirroring --data_path)")
    evaluated = image_folder(data_path, args.split, part_path)
    train = collect(run, image_folder(data_path, "train"), args.batch_size, args.num_workers)
    test = collect(run, evaluated, args.batch_size, args.num_workers)
    read = test.pop("read")
    test = {name: value[read] for name, value in test.items()}
    truth = np.stack([true_labels(p, run.img_size, run.patch_size) for p in evaluated.part_paths[read]])
    num_maps = run.model.learner.num_maps
    predictions = {
        "learned parts": test["learned"],
        f"k-means of patch tokens (k={num_maps})": kmeans_parts(
            fit_kmeans(train["tokens"][train["read"]], num_maps, args.seed), test["tokens"]),
        f"raw attention (argmax of {test['attention'].shape[1]} heads)": attention_parts(test["attention"]),
        "one part (reference)": np.zeros_like(test["learned"]),
    }
    results = {name: part_scores(pred, truth)._asdict() for name, pred in predictions.items()}
    _report(results, run, args, len(truth))
    return results


def _report(results: dict[str, dict[str, Any]], run: PartsRun, args: argparse.Namespace, count: int) -> None:
    width = max(map(len, results))
    print(f"{count} images ({args.split}), {run.grid}x{run.grid} patches; mIoU after Hungarian matching and ARI "
          "over all patches pooled, ARI/img averaged over images")
    print(f"{'':<{width}}  {'mIoU':>6}  {'ARI':>6}  {'ARI/img':>7}  IoU per true part")
    for name, s in results.items():
        print(f"{name:<{width}}  {s['miou']:6.3f}  {s['ari']:6.3f}  {s['ari_per_image']:7.3f}  "
              + " ".join(f"{x:.2f}" for x in s["iou"]))
    out = Path(args.out or Path(args.checkpoint) / f"parts_eval_{args.split}.json")
    out.write_text(json.dumps({"split": args.split, "images": count, "results": results}, indent=1))
    print(f"wrote {out}")


def parse_view(name: str, argv: Sequence[str]) -> argparse.Namespace:
    """Flags of `show` and `eval`."""
    parser = _run_parser(name, {"show": "a PNG of images with their parts", "eval": "part quality vs true parts"}[name])
    parser.add_argument("--part_path", default=None, help="true part maps (default with the demo: its parts)")
    parser.add_argument("--split", default="val", help="the image folder's split")
    parser.add_argument("--out", default=None, help="output file (default: in --checkpoint)")
    parser.add_argument("--num_images", type=int, default=8, help="show: images in the picture")
    parser.add_argument("--seed", type=int, default=0, help="eval: k-means seed")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- entries


def train_main(argv: Sequence[str], load_params: BackboneLoader) -> None:
    """`python main.py parts train ...`; `load_params` reads the backbone checkpoint."""
    config_lib.run_job("main.py parts train", train, parse_train(argv), load_params)


def export_main(argv: Sequence[str]) -> None:
    """`python main.py parts export ...`."""
    config_lib.run_job("main.py parts export", export, parse_export(argv))


def show_main(argv: Sequence[str]) -> None:
    """`python main.py parts show ...`."""
    config_lib.run_job("main.py parts show", show, parse_view("show", argv))


def eval_main(argv: Sequence[str]) -> None:
    """`python main.py parts eval ...`."""
    config_lib.run_job("main.py parts eval", evaluate, parse_view("eval", argv))
