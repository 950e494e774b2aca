"""Images → VQGAN token shards (parquet ``caption`` + ``encoding``), the DalleBart training data.

Images are encoded in fixed-size batches by one jitted ``VQModel.encode``; with a mesh the batch is split
over the ``"data"`` axis (the last batch is padded to a full one and the padding dropped), with the params
replicated. Captions are stored raw: the DalleBart trainer normalises them, as inference does.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from engine.config import VQGANConfig
from engine.models.vqgan import VQModel
from training.checkpoint import load_flax_params
from training.data.parquet import TokenShardWriter
from training.data.shapes import ShapesConfig, ShapesDataset
from training.train_vqgan import encoder_input


def load_vqgan(path: str | Path) -> tuple[VQModel, VQGANConfig, Any]:
    """(model, config, params) from a checkpoint directory with ``config.json`` + ``flax_model.msgpack``."""
    path = Path(path)
    config = VQGANConfig.from_json(path)
    params = load_flax_params(path)
    params = params.get("params", params)
    return VQModel(config, norm_groups=config.norm_groups), config, jax.tree.map(jnp.asarray, params)


class Encoder:
    """Jitted ``images (B, R, R, 3) uint8 or [0,1] floats -> codes (B, (R/f)^2) int32``, optionally sharded.

    Images may also come at the decoder's larger ``output_resolution``: they are box-filtered to R first, as in
    training (:func:`training.train_vqgan.encoder_input`)."""

    def __init__(self, model: VQModel, params: Any, *, mesh: Any = None, batch_size: int = 64):
        self.model = model
        self.resolution = model.config.resolution
        self.mesh = mesh
        n_data = mesh.shape["data"] if mesh is not None else 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = -(-batch_size // n_data) * n_data  # round up to a multiple of the data axis

        def encode(p: Any, images: jax.Array) -> jax.Array:
            return model.apply({"params": p}, images, method=VQModel.encode)[1]

        if mesh is None:
            self.params = params
            self._fn = jax.jit(encode)
            self._in_sharding = None
        else:
            self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
            self._in_sharding = NamedSharding(mesh, PartitionSpec("data"))
            self._fn = jax.jit(encode, in_shardings=(NamedSharding(mesh, PartitionSpec()), self._in_sharding),
                               out_shardings=self._in_sharding)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        out_res = self.model.config.output_resolution
        sizes = {(self.resolution, self.resolution, 3), (out_res, out_res, 3)}
        if images.ndim != 4 or images.shape[1:] not in sizes:
            raise ValueError(
                f"expected images (B, {self.resolution}, {self.resolution}, 3), got shape {images.shape}"
            )
        x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        if x.shape[1] != self.resolution:
            x = encoder_input(x, self.model.config)
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i : i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:  # one compiled shape: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], np.float32)])
            arr = jax.device_put(chunk, self._in_sharding) if self._in_sharding is not None else jnp.asarray(chunk)
            out.append(np.asarray(jax.device_get(self._fn(self.params, arr)))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.model.config.grid_size**2), np.int32)


def shapes_items(num_images: int, *, seed: int = 0, start: int = 0,
                 shapes: ShapesConfig | None = None) -> Iterator[tuple[np.ndarray, str]]:
    """(image uint8, caption) of shapes examples ``start .. start + num_images - 1``."""
    ds = ShapesDataset(seed, shapes)
    for i in range(start, start + num_images):
        ex = ds[i]
        yield ex.image, ex.caption


def encode_items(
    items: Iterable[tuple[np.ndarray, str]],
    vqgan: str | Path | tuple[VQModel, Any],
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    rows_per_shard: int = 10_000,
    total: int | None = None,
    mesh: Any = None,
    progress: bool | None = None,
) -> list[Path]:
    """Encode (image, caption) pairs into parquet shards in ``out_dir``; returns the shard paths.

    ``vqgan``: a checkpoint directory or a ``(model, params)`` pair. Existing shards in ``out_dir`` are an
    error (shards are numbered from 0 and would be overwritten).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if out.is_dir() and any(out.glob("*.parquet")):
        raise FileExistsError(f"{out} already holds parquet shards; choose an empty directory")
    if isinstance(vqgan, (str, Path)):
        model, _, params = load_vqgan(vqgan)
    else:
        model, params = vqgan
    enc = Encoder(model, params, mesh=mesh, batch_size=batch_size)
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, disable=not enabled, unit="img", dynamic_ncols=True)
    it = iter(items)
    with TokenShardWriter(out, rows_per_shard=rows_per_shard) as writer:
        while True:
            chunk = list(itertools.islice(it, enc.batch_size))
            if not chunk:
                break
            images = np.stack([np.asarray(img) for img, _ in chunk])
            writer.write([cap for _, cap in chunk], enc(images))
            bar.update(len(chunk))
    bar.close()
    return writer.paths


def encode_shapes(
    vqgan: str | Path | tuple[VQModel, Any],
    out_dir: str | Path,
    *,
    num_images: int,
    seed: int = 0,
    start: int = 0,
    shapes: ShapesConfig | None = None,
    **kwargs: Any,
) -> list[Path]:
    """Encode shapes examples ``start .. start + num_images - 1`` (dataset seed ``seed``) into token shards."""
    if isinstance(vqgan, (str, Path)):
        model, config, params = load_vqgan(vqgan)
    else:
        model, params = vqgan
        config = model.config
    # drawn at the decoder's size and box-filtered by the Encoder, exactly as the VQGAN saw them in training
    shapes = shapes or ShapesConfig(image_size=config.output_resolution,
                                    factor=config.downsample_factor * config.upsample_factor)
    if shapes.image_size not in (config.resolution, config.output_resolution):
        raise ValueError(f"dataset image_size {shapes.image_size} != VQGAN resolution {config.resolution}")
    items = shapes_items(num_images, seed=seed, start=start, shapes=shapes)
    return encode_items(items, (model, params), out_dir, total=num_images, **kwargs)
