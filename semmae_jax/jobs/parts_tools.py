"""Stage 1 with a trained part model: export its part maps, draw them, score them.

    python main.py parts export --checkpoint OUT [--data_path DIR] --out PART_DIR
    python main.py parts show   --checkpoint OUT [--data_path DIR] [--out parts.png]
    python main.py parts eval   --checkpoint OUT [--data_path DIR --part_path TRUE_PARTS]

A `parts train` run's checkpoint holds the frozen backbone with the learner, so it is all
these need. Without `--data_path` they use the demo data (whose true part maps `eval` and
`show` read). Each process works on its own images (`export` on its share of the split),
so the params are replicated over its local devices and batches split over them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from semmae_jax import config as config_lib
from semmae_jax import sharding
from semmae_jax.checkpoint import RunCheckpoints
from semmae_jax.config import field
from semmae_jax.data.bands import Bands, data_bands
from semmae_jax.data.demo import data_or_demo
from semmae_jax.data.part_maps import NO_PART, part_map_path, write_part_map
from semmae_jax.image_size import ImageSize
from semmae_jax.inference import visualize
from semmae_jax.parts import (
    PartModel,
    assign_parts,
    attention_parts,
    build_part_model,
    fit_kmeans,
    kmeans_parts,
    last_cls_attention,
    part_scores,
)
from semmae_jax.runtime import distributed
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.runtime.storage import save_png
from semmae_jax.train.flags import DistributedFlags


@dataclasses.dataclass(frozen=True)
class ToolFlags:
    """What every stage-1 tool reads: a trained run and the images to apply it to."""

    checkpoint: str = field("", "a parts train --output_dir (or its checkpoints/)")
    data_path: str | None = field(None, "image folder root (default: the demo data)")
    batch_size: int = field(64, "images per device and batch (each process runs on its own devices)")
    num_workers: int = field(8, "parallel decoding calls (tf.data)")
    split: str = field("val", "the image folder's split")
    out: str | None = field(None, "output (default: in --checkpoint)")


@dataclasses.dataclass(frozen=True)
class ExportConfig(DistributedFlags, ToolFlags):
    """`parts export`: one PNG part map per image, resumable, one share per process."""

    out: str | None = field(None, "root of the part-map tree (mirrors --data_path)")
    split: str = field("train", "the image folder's split to export")
    map_scale: int = field(1, "maps at the patch grid times this (bilinear)")


@dataclasses.dataclass(frozen=True)
class ViewConfig(ToolFlags):
    """`parts show` / `parts eval`: a picture of the parts, or their scores against true part maps."""

    part_path: str | None = field(None, "true part maps (default with the demo: its parts)")
    num_images: int = field(8, "show: images in the picture")
    seed: int = field(0, "eval: k-means seed")

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
    def img_size(self) -> ImageSize:
        return self.model.backbone.img_size

    @property
    def patch_size(self) -> int:
        return self.model.backbone.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        """The backbone's patch grid (rows, columns)."""
        return self.model.backbone.grid_hw

    @property
    def bands(self) -> Bands | None:
        """How the run read its images (`data.bands`): its --mean / --std, or its dataset's statistics."""
        return data_bands(self.config.get("data_path"), self.model.backbone.in_chans, self.config.get("mean"),
                          self.config.get("std"))


def load_run(path: str) -> PartsRun:
    """The latest checkpoint of a `parts train` run (its output dir or its `checkpoints/`)."""
    root = Path(path)
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not directory.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such run directory")
    checkpoints = RunCheckpoints(directory, async_save=False, create=False)
    step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"--checkpoint {path}: no checkpoint in {directory}")
    config = checkpoints.json_item(step, "config") or {}
    if config.get("job") != "parts":
        checkpoints.close()
        raise ValueError(f"--checkpoint {path}: a {config.get('job')!r} run, not a parts run")
    params = checkpoints.host_arrays(step, "params")
    checkpoints.close()
    return PartsRun(build_part_model(config, config["backbone_model"], config["backbone_overrides"]), params, config)


def local_mesh() -> jax.sharding.Mesh:
    """This process's devices on the data axis, for commands where every process works on its own images."""
    return sharding.make_mesh(devices=jax.local_devices())


def run_batches(run: PartsRun, source: Any, process_batch: int, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's evaluation batches of `source` (whole images at the backbone's size), in listing order."""
    from semmae_jax import data

    loader = data.EvalLoader(source, process_batch=process_batch,
                             transform=data.WholeImageTransform(run.img_size, run.patch_size, bands=run.bands),
                             num_workers=num_workers, process_index=0, process_count=1)
    return loader.batches()


def predictor(run: PartsRun, mesh: jax.sharding.Mesh, fn: Callable[[Any, Any], Any]) -> Callable[[np.ndarray], Any]:
    """`images -> fn(outputs, intermediates)` jitted on `mesh` (batch split over it), fetched to numpy."""
    params = jax.device_put(run.params, sharding.replicated(mesh))
    batch = sharding.batch_sharding(mesh)

    @jax.jit
    def apply(params: Any, images: jax.Array) -> Any:
        outputs, state = run.model.apply({"params": params}, images, mutable=["intermediates"])
        return fn(outputs, state["intermediates"])

    return lambda images: jax.tree.map(np.asarray, apply(params, jax.device_put(images, batch)))


# ----------------------------------------------------------------------------- export


def export(args: ExportConfig) -> dict[str, int]:
    """Part maps of this process's share of the split, skipping maps already written. Returns the counts."""
    if not args.out:
        raise ValueError("--out is required: the root of the part-map tree to write")
    args.start_runtime()
    from semmae_jax.data import image_folder
    from semmae_jax.data.sources import Shard, eval_share

    run = load_run(args.checkpoint)
    data_path, _ = data_or_demo(args.data_path)
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


def _write_maps(run: PartsRun, subset: Any, data_path: str, args: ExportConfig, counts: dict[str, int]) -> None:
    """Predict and write the maps of `subset`, counting what was written."""
    mesh = local_mesh()
    predict = predictor(run, mesh, lambda out, _: assign_parts(out.maps, run.background, args.map_scale))
    process_batch = local_batch(args.batch_size, mesh)
    batches = run_batches(run, subset, process_batch, args.num_workers)
    first = 0
    for batch in tqdm(batches, total=-(-subset.num_examples // process_batch), desc="export",
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


def local_batch(per_device: int, mesh: jax.sharding.Mesh) -> int:
    """A process's batch on its own devices (`local_mesh`): `--batch_size` images on each."""
    return BatchGeometry.from_flags(per_device, devices=mesh.size, processes=1).per_process


# ------------------------------------------------------------------------ show / eval


def show(args: ViewConfig) -> Path:
    """A PNG of `num_images` images spread over the split, first to last: image | learned parts | true parts
    (when there are)."""
    from semmae_jax.data import image_folder

    run = load_run(args.checkpoint)
    data_path, part_path = data_or_demo(args.data_path, args.part_path)
    source = image_folder(data_path, args.split, part_path, missing_parts="unlabelled")
    ids = np.linspace(0, source.num_examples - 1, min(args.num_images, source.num_examples)).astype(np.int64)
    subset = dataclasses.replace(source, paths=source.paths[ids], labels=source.labels[ids], part_paths=source.part_paths[ids])
    mesh = local_mesh()
    predict = predictor(run, mesh, lambda out, _: assign_parts(out.maps, run.background))
    batch = next(run_batches(run, subset, local_batch(-(-len(ids) // mesh.size), mesh), args.num_workers))
    learned = predict(batch["image"]).reshape(len(batch["image"]), -1)
    truth = batch["part_labels"][: len(ids)]
    label_sets = [learned[: len(ids)]] + ([truth] if (truth >= 0).any() else [])
    out = Path(args.out or Path(args.checkpoint) / f"parts_{args.split}.png")
    save_png(out, visualize.parts_panel(batch["image"][: len(ids)], label_sets))
    print(f"wrote {out}: {len(ids)} images of {data_path} ({args.split}): image | learned parts"
          + (" | true parts" if len(label_sets) > 1 else ""))
    return out


def collect(run: PartsRun, source: Any, per_device: int, num_workers: int) -> dict[str, np.ndarray]:
    """Learned part ids (the background is id N), patch tokens, last cls attention and true part
    labels (-1 without a map) of every image.

    Each array has one row per image of `source`, in order; 'read' is False for an image
    the pipeline could not read (its other rows are blank).
    """
    depth = run.model.backbone.depth

    def outputs(out: Any, intermediates: Any) -> dict[str, jax.Array]:
        return {"learned": jnp.argmax(out.maps, axis=1).reshape(out.maps.shape[0], -1), "tokens": out.patches,
                "attention": last_cls_attention(intermediates["backbone"], depth)}

    mesh = local_mesh()
    predict = predictor(run, mesh, outputs)
    parts = [{**predict(b["image"]), "truth": b["part_labels"], "read": b["mask"]}
             for b in run_batches(run, source, local_batch(per_device, mesh), num_workers)]
    return {name: np.concatenate([p[name] for p in parts])[: source.num_examples] for name in parts[0]}


def evaluate(args: ViewConfig) -> dict[str, dict[str, Any]]:
    """mIoU / ARI of the learned parts and of the baselines against the true part maps."""
    from semmae_jax.data import image_folder

    run = load_run(args.checkpoint)
    data_path, part_path = data_or_demo(args.data_path, args.part_path)
    if part_path is None:
        raise ValueError("eval needs the true part maps: --part_path (a part-map tree mirroring --data_path)")
    evaluated = image_folder(data_path, args.split, part_path)
    train = collect(run, image_folder(data_path, "train"), args.batch_size, args.num_workers)
    test = collect(run, evaluated, args.batch_size, args.num_workers)
    read = test.pop("read")
    test = {name: value[read] for name, value in test.items()}
    truth = test["truth"]
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


def _report(results: dict[str, dict[str, Any]], run: PartsRun, args: ViewConfig, count: int) -> None:
    width = max(map(len, results))
    print(f"{count} images ({args.split}), {run.grid[0]}x{run.grid[1]} patches; mIoU after Hungarian matching and ARI "
          "over all patches pooled, ARI/img averaged over images")
    print(f"{'':<{width}}  {'mIoU':>6}  {'ARI':>6}  {'ARI/img':>7}  IoU per true part")
    for name, s in results.items():
        print(f"{name:<{width}}  {s['miou']:6.3f}  {s['ari']:6.3f}  {s['ari_per_image']:7.3f}  "
              + " ".join(f"{x:.2f}" for x in s["iou"]))
    out = Path(args.out or Path(args.checkpoint) / f"parts_eval_{args.split}.json")
    out.write_text(json.dumps({"split": args.split, "images": count, "results": results}, indent=1))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------- entries


def _parse(argv: Sequence[str], config_cls: type, name: str) -> Any:
    config = config_lib.parse_job_config(argv, config_cls, f"main.py parts {name}", config_cls.__doc__)
    if not config.checkpoint:
        raise SystemExit(f"main.py parts {name}: error: --checkpoint is required (a parts train --output_dir)")
    return config


def export_main(argv: Sequence[str]) -> None:
    """`python main.py parts export ...`."""
    config_lib.one_line_errors("main.py parts export", export, _parse(argv, ExportConfig, "export"))


def show_main(argv: Sequence[str]) -> None:
    """`python main.py parts show ...`."""
    config_lib.one_line_errors("main.py parts show", show, _parse(argv, ViewConfig, "show"))


def eval_main(argv: Sequence[str]) -> None:
    """`python main.py parts eval ...`."""
    config_lib.one_line_errors("main.py parts eval", evaluate, _parse(argv, ViewConfig, "eval"))
