"""Use a trained encoder: `python main.py features` and `python main.py knn`.

    python main.py features --checkpoint CKPT --data_path D [--split train|val] [--tokens cls|mean|patch]
                            [--layers 3,5,7,11] --out F.npz
    python main.py knn --train F_train.npz --val F_val.npz [--k 20] [--temperature 0.07]
    python main.py knn --checkpoint CKPT --data_path D         # both extractions, then the vote

CKPT is anything the converter reads (an orbax run or release, a `.pth`, a transformers
directory); its encoder is taken as `parts train --backbone` takes it (`WeightsReader.backbone`).
Without `--data_path` (and `--dataset`) the demo data is used.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semmae_jax import config as config_lib
from semmae_jax.checkpoint import WeightsReader
from semmae_jax.config import field
from semmae_jax.data.bands import data_bands
from semmae_jax.image_size import image_size, size_text
from semmae_jax.inference.features import TOKENS, VECTORS, Features, extract, load_features, save_features
from semmae_jax.inference.knn import KnnResult, knn_accuracy
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.train.flags import BandFlags, DistributedFlags


@dataclasses.dataclass(frozen=True)
class ExtractFlags(BandFlags):
    """Which encoder, on which images, how."""

    checkpoint: str | None = field(None, "an orbax run (or its checkpoints/), a .pth, a transformers directory")
    data_path: str | None = field(None, "image folder or packed data with train/ and val/ (default: the demo data)")
    dataset: str = field("folder", "'folder' (--data_path) or 'tfds:NAME'")
    tfds_data_dir: str | None = field(None, "TFDS data dir")
    tokens: str = field("cls", "the cls token, the mean of the patch tokens, or the patch tokens as a map "
                               "[H/p, W/p, D] (after the final norm)", choices=TOKENS)
    input_size: int | tuple[int, int] | None = field(None, "image size: one side or HEIGHT WIDTH (default: the "
                                                           "checkpoint's)", join=image_size)
    batch_size: int = field(64, "images per device and batch")
    num_workers: int = field(8, "parallel decoding calls (tf.data)")
    mesh: str = field("data:-1,fsdp:1,tensor:1", "device mesh, e.g. data:-1,fsdp:2")


@dataclasses.dataclass(frozen=True)
class FeaturesConfig(DistributedFlags, ExtractFlags):
    """`main.py features`: one split's encoder features, labels and file names as an .npz."""

    split: str = field("train", "the dataset's split", choices=("train", "val"))
    layers: str | None = field(None, "also these blocks' outputs, before the final norm: comma-separated 0-based "
                                     "indices, e.g. 3,5,7,11 (ViTDet, UperNet)")
    out: str | None = field(None, "the .npz to write (arrays features, labels, file_names; layers, layer_indices)")

    def check(self) -> None:
        self.layer_indices()

    def layer_indices(self) -> tuple[int, ...]:
        try:
            return tuple(int(i) for i in self.layers.split(",")) if self.layers else ()
        except ValueError:
            raise ValueError(f"--layers {self.layers}: comma-separated block indices, e.g. 3,5,7,11") from None


@dataclasses.dataclass(frozen=True)
class KnnConfig(DistributedFlags, ExtractFlags):
    """`main.py knn`: weighted k-NN (DINO's protocol) of val features against train features."""

    train: str | None = field(None, "training features (.npz of main.py features)")
    val: str | None = field(None, "validation features (.npz of main.py features)")
    k: int = field(20, "neighbours that vote")
    temperature: float = field(0.07, "votes weigh exp(cosine similarity / T)")
    out: str | None = field(None, "also write the result as JSON here")

    def check(self) -> None:
        if self.tokens not in VECTORS:
            raise ValueError(f"--tokens {self.tokens}: k-NN scores one vector per image, --tokens cls or mean")


def encoder(reader: WeightsReader, checkpoint: str, input_size: int | None) -> tuple[Any, Any]:
    """(headless ViT, its params) of `checkpoint`'s encoder; a run's output dir is read at its checkpoints/."""
    from semmae_jax.parts.backbone import backbone_model

    params, name, overrides = reader.encoder(checkpoint, input_size)
    return backbone_model(name, overrides), params


def features(config: ExtractFlags, reader: WeightsReader, split: str, layers: Sequence[int] = ()) -> Features:
    """The encoder's features of one split of the flags' dataset, on the flags' mesh."""
    import jax

    from semmae_jax import sharding
    from semmae_jax.data import open_source
    from semmae_jax.data.demo import data_or_demo

    if not config.checkpoint:
        raise ValueError("--checkpoint is required (an orbax run, a .pth or a transformers directory)")
    batch = BatchGeometry.from_flags(config.batch_size)
    model, params = encoder(reader, config.checkpoint, config.input_size)
    data_path, _ = data_or_demo(config.data_path, None, config.dataset)
    bands = data_bands(data_path, model.in_chans, config.mean, config.std)
    source = open_source(data_path, split, dataset=config.dataset, tfds_data_dir=config.tfds_data_dir, bands=bands)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        found, skipped = extract(model, params, source, tokens=config.tokens, layers=layers, mesh=mesh,
                                 num_workers=config.num_workers, batch=batch, bands=bands)
    left_out = f"; {len(skipped)} unreadable image(s) left out (named above)" if skipped else ""
    of_blocks = f", and of blocks {','.join(map(str, layers))} before it" if layers else ""
    print(f"{len(found.labels)} images of {data_path or config.dataset} ({split}): {config.tokens} features of shape "
          f"{list(found.features.shape[1:])} after the final norm{of_blocks}, from {config.checkpoint} at "
          f"{size_text(model.img_size)}{left_out}", flush=True)
    return found


def extract_features(config: FeaturesConfig, reader: WeightsReader) -> Features:
    from semmae_jax.runtime.distributed import is_primary

    if not config.out:
        raise ValueError("--out is required: the .npz to write")
    config.start_runtime()
    found = features(config, reader, config.split, config.layer_indices())
    if is_primary():
        save_features(config.out, found)
        print(f"wrote {config.out}")
    return found


def score_knn(config: KnnConfig, reader: WeightsReader) -> KnnResult:
    """Score the val features by k-NN against the train features (read, or extracted first)."""
    from semmae_jax.runtime.distributed import is_primary

    if config.checkpoint and (config.train or config.val):
        raise ValueError("give --checkpoint (features are extracted) or --train and --val (.npz files), not both")
    if config.checkpoint:
        config.start_runtime()
        train, val = (features(config, reader, split) for split in ("train", "val"))
    elif config.train and config.val:
        train, val = load_features(config.train), load_features(config.val)
    else:
        raise ValueError("knn needs --train F_train.npz and --val F_val.npz, or --checkpoint CKPT (with --data_path)")
    result = knn_accuracy(train.features, train.labels, val.features, val.labels, k=config.k,
                          temperature=config.temperature)
    print(f"* k-NN Acc@1 {result.acc1:.3f} Acc@5 {result.acc5:.3f} (k {config.k}, T {config.temperature:g}; "
          f"{result.count} val against {len(train.labels)} train features)")
    if config.out and is_primary():
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps({**result._asdict(), "k": config.k, "temperature": config.temperature,
                                                "train": len(train.labels)}, indent=1))
    return result


def features_main(argv: Sequence[str], reader: WeightsReader) -> None:
    """`python main.py features ...`."""
    config = config_lib.parse_job_config(argv, FeaturesConfig, "main.py features", __doc__)
    config_lib.one_line_errors("main.py features", extract_features, config, reader)


def knn_main(argv: Sequence[str], reader: WeightsReader) -> None:
    """`python main.py knn ...`."""
    config = config_lib.parse_job_config(argv, KnnConfig, "main.py knn", __doc__)
    config_lib.one_line_errors("main.py knn", score_knn, config, reader)
