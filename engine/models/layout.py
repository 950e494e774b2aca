"""DalleBart parameter layouts: scanned and unscanned trees, loading a published file, the sampler's decode layout.

The published ``flax_model.msgpack`` files come in two layouts (see :mod:`engine.models.dallebart`): *scanned*
(``layers/FlaxBartEncoderLayers/...`` with a leading layer axis) and *unscanned* (``layers/FlaxBartEncoderLayer_{i}``).
:func:`scan_params` / :func:`unscan_params` convert between them, :func:`normalize_layout` converts either to the
layout a config's module builds, and :func:`load_dallebart_params` reads a file (or a restored tree) in either
layout, checks every parameter's shape against the config and returns it in the config's layout.

:func:`to_decode_layout` makes the sampler's decode copy: unscanned, cast, with dense kernels stored ``(out, in)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from engine.config import DalleBartConfig
from engine.models.dallebart import Params, param_shapes


def count_params(tree: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def cast_params(params: Params, dtype: Any) -> Params:
    """Cast every floating leaf to ``dtype`` (None keeps stored dtypes)."""
    if dtype is None:
        return params
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


_SCANNED = {"encoder": "FlaxBartEncoderLayers", "decoder": "FlaxBartDecoderLayers"}
_UNSCANNED = {
    "encoder": re.compile(r"^FlaxBartEncoderLayer_(\d+)$"),
    "decoder": re.compile(r"^FlaxBartDecoderLayer_(\d+)$"),
}


def _unwrap(tree: Mapping) -> dict:
    tree = dict(tree)
    if set(tree) == {"params"}:
        tree = dict(tree["params"])
    return tree


def _layers_of(tree: Mapping, side: str) -> Mapping:
    try:
        return tree["model"][side]["layers"]
    except (KeyError, TypeError):
        raise ValueError(f"param tree has no 'model/{side}/layers' (not a DalleBart checkpoint?)") from None


def _replace_layers(tree: Mapping, side: str, layers: dict) -> dict:
    out = dict(tree)
    out["model"] = dict(tree["model"])
    out["model"][side] = dict(tree["model"][side])
    out["model"][side]["layers"] = layers
    return out


def _is_scanned(layers: Mapping, side: str) -> bool:
    if _SCANNED[side] in layers:
        return True
    if any(_UNSCANNED[side].match(k) for k in layers):
        return False
    raise ValueError(f"model/{side}/layers has neither {_SCANNED[side]} nor {_SCANNED[side][:-1]}_<i> entries")


def scan_params(tree: Mapping) -> Params:
    """Unscanned layout (``FlaxBart*Layer_{i}``) -> scanned (``FlaxBart*Layers``, leading layer axis)."""
    tree = _unwrap(tree)
    for side in ("encoder", "decoder"):
        layers = _layers_of(tree, side)
        if _is_scanned(layers, side):
            continue
        by_index = sorted(((int(_UNSCANNED[side].match(k).group(1)), v) for k, v in layers.items()))
        if [i for i, _ in by_index] != list(range(len(by_index))):
            raise ValueError(f"model/{side}/layers: layer indices are not 0..{len(by_index) - 1}")
        first = traverse_util.flatten_dict(dict(by_index[0][1]), sep="/")
        for i, layer in by_index[1:]:
            flat = traverse_util.flatten_dict(dict(layer), sep="/")
            for name in sorted(set(first) | set(flat)):
                if name not in flat or name not in first or np.shape(flat[name]) != np.shape(first[name]):
                    raise ValueError(
                        f"cannot stack model/{side}/layers: parameter {_SCANNED[side][:-1]}_{i}/{name} differs "
                        f"from layer 0 (shape {np.shape(flat.get(name))} vs {np.shape(first.get(name))})"
                    )
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[v for _, v in by_index])
        tree = _replace_layers(tree, side, {_SCANNED[side]: stacked})
    return tree


def unscan_params(tree: Mapping) -> Params:
    """Scanned layout -> unscanned (one sub-tree per layer, no leading axis)."""
    tree = _unwrap(tree)
    for side in ("encoder", "decoder"):
        layers = _layers_of(tree, side)
        if not _is_scanned(layers, side):
            continue
        stacked = layers[_SCANNED[side]]
        n = jax.tree.leaves(stacked)[0].shape[0]
        per = {f"{_SCANNED[side][:-1]}_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
        tree = _replace_layers(tree, side, per)
    return tree


def normalize_layout(tree: Mapping, config: DalleBartConfig) -> Params:
    """Either published layout -> the layout the module builds for ``config`` (scanned iff ``config.use_scan``)."""
    return scan_params(tree) if config.use_scan else unscan_params(tree)


def check_shapes(tree: Mapping, expected: Mapping) -> None:
    got = traverse_util.flatten_dict(dict(tree), sep="/")
    want = traverse_util.flatten_dict(dict(expected), sep="/")
    for path in sorted(set(want) | set(got)):
        if path not in got:
            raise ValueError(f"checkpoint is missing parameter {path} (expected shape {tuple(want[path].shape)})")
        if path not in want:
            raise ValueError(f"checkpoint has unexpected parameter {path} (shape {tuple(np.shape(got[path]))})")
        if tuple(np.shape(got[path])) != tuple(want[path].shape):
            raise ValueError(
                f"parameter {path} has shape {tuple(np.shape(got[path]))}, config expects {tuple(want[path].shape)}"
            )


def load_dallebart_params(
    path_or_tree: str | Path | Mapping, config: DalleBartConfig, dtype: Any = None
) -> Params:
    """Load a published-layout DalleBart param tree and check it against ``config``.

    ``path_or_tree``: a ``flax_model.msgpack`` file, a directory holding one, or an already restored nested dict
    (optionally wrapped in ``{"params": ...}``). Either layout is accepted; the result is in the layout of
    ``config.use_scan``, cast to ``dtype`` (None keeps the stored dtype), as ``jax.Array`` leaves. A missing,
    unexpected or mis-shaped parameter raises ``ValueError`` naming the first such path (sorted order).
    """
    if isinstance(path_or_tree, Mapping):
        tree = path_or_tree
    else:
        path = Path(path_or_tree)
        if path.is_dir():
            path = path / "flax_model.msgpack"
        if not path.is_file():
            raise FileNotFoundError(f"no DalleBart checkpoint at {path}")
        tree = serialization.msgpack_restore(path.read_bytes())
    tree = _unwrap(tree)
    scanned = {_is_scanned(_layers_of(tree, side), side) for side in ("encoder", "decoder")}
    if len(scanned) == 1:  # check in the file's own layout first, so errors name the file's paths
        check_shapes(tree, param_shapes(dataclasses.replace(config, use_scan=scanned.pop())))
    tree = normalize_layout(tree, config)
    check_shapes(tree, param_shapes(config))
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype) if dtype is not None else jnp.asarray(x), tree)


# ----------------------------------------------------------------------------------------------
# The sampler's decode layout
# ----------------------------------------------------------------------------------------------


def is_kernel(path: tuple) -> bool:
    """Whether a pytree path names a dense-layer kernel (a leaf called ``kernel``)."""
    return bool(path) and getattr(path[-1], "key", None) == "kernel"


def map_kernels(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every dense-layer kernel of a param or sharding tree."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(leaf) if is_kernel(path) else leaf, tree)


def to_decode_layout(params: Any, dtype: Any = None, *, host: bool = False, transpose: bool = True) -> Any:
    """Unscanned params with published ``(in, out)`` dense kernels -> ``(out, in)`` row-major: the layout of a
    model built with ``transposed_kernels=True``, which the sampler decodes with. Floating leaves are cast to
    ``dtype`` (None keeps them) in the same pass, one leaf at a time, so the new tree is the only extra copy.
    The result is numpy arrays when ``host`` (to be placed on a mesh afterwards), else ``jax.Array`` leaves.

    A decode step multiplies 2B rows by every weight matrix once: a skinny GEMM whose speed is set by how fast
    the weights stream in. :class:`~engine.models.dallebart.Dense` computes it as ``kernel @ x.T`` on this layout,
    the form in which XLA:CPU streams the kernel as stored. Measured on the mini decode GEMMs at 16 rows (2-core
    CPU): ``x @ kernel`` on the published layout ~5-7 GB/s, ``x @ kernel.T`` ~8-12 GB/s (XLA repacks the kernel
    every call), ``kernel @ x.T`` ~15 GB/s. Transposing inside the program instead copied the kernels each step.
    At 1-2 rows (one candidate) the published layout is ~15% faster than ``x @ kernel.T``, and ``kernel @ x.T``
    faster than both: mini's batch-1 step takes 37-51 ms against 67-84 ms with ``x @ kernel.T`` (bench/RESULTS.md,
    "The decode GEMMs: kernel on the left").
    ``transpose=False`` keeps the published kernels (only the cast): the layout for accelerators, whose GEMM
    libraries take either operand order as stored (:func:`default_transposed_kernels`).
    """

    xp = np if host else jnp

    def convert(path: tuple, x: Any) -> Any:
        x = xp.asarray(x)
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        if not (transpose and is_kernel(path)):
            return x
        if x.ndim != 2:
            raise ValueError(f"decode layout: kernel {jax.tree_util.keystr(path)} has shape {x.shape}, expected 2-D "
                             "(unscanned) params")
        return np.ascontiguousarray(x.T) if host else x.T  # eager jnp: a new, physically transposed array

    return jax.tree_util.tree_map_with_path(convert, params)
