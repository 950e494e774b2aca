"""Checkpoint I/O shared by every model: read published files, check them against the model, cast, save.

Readers (all return a nested ``dict`` of numpy arrays, no transformers code involved):
  * HF ``flax_model.msgpack`` (flax msgpack; arrays > 2**30 bytes stored as
    ``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}`` are re-assembled);
  * HF sharded checkpoints: ``*.index.json`` with a ``weight_map`` of shard files (msgpack or safetensors);
  * ``.safetensors`` in ``"flax"`` format (dotted names → nesting) or ``"pt"`` format (PyTorch names and
    layouts, converted by :mod:`engine.convert`);
  * ``pytorch_model.bin`` (only if torch is installed; converted likewise).

``load_params`` = read → optional model-specific ``normalize`` hook → :func:`check_tree` against the
model's ``jax.eval_shape`` tree → optional dtype cast. Our own checkpoints are plain flax msgpack
(:func:`save_params` / :func:`restore_params`), or orbax for sharded trees (:func:`save_sharded`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from engine import convert

Tree = dict[str, Any]

# file names looked up, in order, when ``path`` is a directory
CHECKPOINT_NAMES = (
    "flax_model.msgpack",
    "flax_model.msgpack.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "params.msgpack",
)

_DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16, "half": jnp.float16,
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def _unchunk(tree: Any) -> Any:
    """Re-assemble flax's chunked-array dicts anywhere in the tree (flax does it too; this is a backstop)."""
    if isinstance(tree, Mapping):
        if tree.get("__msgpack_chunked_array__"):
            shape = tuple(int(v) for v in _ordered(tree["shape"]))
            flat = np.concatenate([np.asarray(c).reshape(-1) for c in _ordered(tree["chunks"])])
            return flat.reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def _ordered(d: Any) -> list[Any]:
    if isinstance(d, Mapping):
        return [d[k] for k in sorted(d, key=int)]
    return list(d)


def read_msgpack(path: str | Path) -> Tree:
    """A flax msgpack file (HF ``flax_model.msgpack`` or ours) → nested dict of numpy arrays."""
    path = Path(path)
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # msgpack raises a zoo of exception types on corrupt data
        raise CheckpointError(f"{path}: not a readable flax msgpack file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path}: msgpack does not hold a parameter dict")
    return _unchunk(dict(tree))


def safetensors_format(path: str | Path) -> str | None:
    """The ``format`` metadata of a safetensors file (``"flax"``, ``"pt"``, ``"np"`` or None)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return (f.metadata() or {}).get("format")


def read_safetensors(path: str | Path, *, from_torch: Callable[[Mapping[str, Any]], Tree] | None = None) -> Tree:
    """A ``.safetensors`` file → nested dict. PyTorch-format files go through ``from_torch``
    (default :func:`engine.convert.detect_and_convert`); other files use dotted names for nesting."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        fmt = safetensors_format(path)
        flat = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if fmt == "pt":
        return (from_torch or convert.detect_and_convert)(flat)
    return unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})


def read_torch_bin(path: str | Path, *, from_torch: Callable[[Mapping[str, Any]], Tree] | None = None) -> Tree:
    """A ``pytorch_model.bin`` / taming ``.ckpt`` (needs torch; loaded with ``weights_only=True``)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading PyTorch pickles needs torch; convert to safetensors") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return (from_torch or convert.detect_and_convert)(state)


def _read_sharded(index_path: Path, from_torch: Callable[[Mapping[str, Any]], Tree] | None) -> Tree:
    try:
        index = json.loads(index_path.read_text())
        shard_names = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{index_path}: not a sharded-checkpoint index (needs a 'weight_map')") from exc
    if str(index_path).endswith((".bin.index.json",)) or any(n.endswith(".bin") for n in shard_names):
        state: dict[str, Any] = {}
        import torch

        for name in shard_names:
            state.update(torch.load(str(index_path.parent / name), map_location="cpu", weights_only=True))
        return (from_torch or convert.detect_and_convert)(state)
    if all(n.endswith(".safetensors") for n in shard_names):
        from safetensors.numpy import load_file

        flat_st: dict[str, Any] = {}
        fmts = set()
        for name in shard_names:
            fmts.add(safetensors_format(index_path.parent / name))
            flat_st.update(load_file(str(index_path.parent / name)))
        if "pt" in fmts:
            return (from_torch or convert.detect_and_convert)(flat_st)
        return unflatten_dict({tuple(k.split(".")): v for k, v in flat_st.items()})
    merged: dict[tuple[str, ...], Any] = {}
    for name in shard_names:
        shard = read_msgpack(index_path.parent / name)
        # HF writes each shard as a nested tree; tolerate "a/b/c" flat keys as well
        for key, value in flatten_dict(shard, sep="/").items():
            merged[tuple(key.split("/"))] = value
    return unflatten_dict(merged)


def resolve_checkpoint(path: str | Path) -> Path:
    """A directory → the first known checkpoint file in it; a file → itself."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).exists():
                return path / name
        raise CheckpointError(f"{path}: no checkpoint file found (looked for {', '.join(CHECKPOINT_NAMES)})")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def read_checkpoint(path: str | Path, *, from_torch: Callable[[Mapping[str, Any]], Tree] | None = None) -> Tree:
    """Read any supported checkpoint (file or directory) into a nested dict of numpy arrays."""
    path = resolve_checkpoint(path)
    name = path.name
    if name.endswith(".index.json"):
        return _read_sharded(path, from_torch)
    if name.endswith(".safetensors"):
        return read_safetensors(path, from_torch=from_torch)
    if name.endswith((".bin", ".ckpt", ".pt", ".pth")):
        return read_torch_bin(path, from_torch=from_torch)
    return read_msgpack(path)


# ----------------------------------------------------------------------------------------------
# Checking and casting
# ----------------------------------------------------------------------------------------------


def _shape_of(leaf: Any) -> tuple[int, ...]:
    if isinstance(leaf, tuple | list) and all(isinstance(d, int | np.integer) for d in leaf):
        return tuple(int(d) for d in leaf)
    return tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)


def _flat(tree: Any) -> dict[str, Any]:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"expected a parameter dict, got {type(tree).__name__}")
    return flatten_dict(dict(tree), sep="/", keep_empty_nodes=False)


def check_tree(loaded: Any, expected_shapes: Any, name: str = "checkpoint") -> None:
    """Raise one :class:`CheckpointError` naming the first (sorted) missing, unexpected or mis-shaped path.

    ``expected_shapes`` is a tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)``), arrays,
    or int tuples. The message also says how many other problems there are.
    """
    got, want = _flat(loaded), _flat(expected_shapes)
    problems: list[tuple[str, str]] = []
    for key in sorted(set(got) | set(want)):
        if key not in got:
            problems.append((key, f"parameter {key!r} is missing from the checkpoint (model expects shape "
                                  f"{_shape_of(want[key])})"))
        elif key not in want:
            problems.append((key, f"unexpected parameter {key!r} with shape {_shape_of(got[key])} in the checkpoint "
                                  "(the model has no such parameter)"))
        elif _shape_of(got[key]) != _shape_of(want[key]):
            problems.append((key, f"parameter {key!r} has shape {_shape_of(got[key])} in the checkpoint but the "
                                  f"model expects {_shape_of(want[key])}"))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"{name}: {problems[0][1]}{more}")


def as_dtype(dtype: Any) -> Any:
    """``"bf16"``/``"float16"``/``jnp.float32``... → a jnp dtype; a clear error otherwise."""
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise CheckpointError(f"unsupported parameter dtype {d}; use float32, bfloat16 or float16")
    return d


def cast_tree(tree: Any, dtype: Any) -> Any:
    """Cast every floating-point leaf to ``dtype`` (integer leaves are left alone)."""
    target = as_dtype(dtype)

    def cast(x: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x.astype(target) if hasattr(x, "astype") else np.asarray(x).astype(target)
        return x

    return jax.tree.map(cast, tree)


def _strip_wrapper(tree: Tree, expected: Any) -> Tree:
    """``{"params": {...}}`` (a saved ``variables`` dict) → ``{...}`` when the model tree has no such key."""
    want = expected.unfreeze() if hasattr(expected, "unfreeze") else expected
    if isinstance(want, Mapping) and set(tree) == {"params"} and "params" not in want:
        return tree["params"]
    return tree


def load_params(
    path: str | Path,
    expected_shapes: Any,
    *,
    dtype: Any = None,
    normalize: Callable[[Tree], Tree] | None = None,
    from_torch: Callable[[Mapping[str, Any]], Tree] | None = None,
    drop_unexpected: bool = False,
) -> Tree:
    """Read a checkpoint, fit it to the model and return a tree of ``jax.Array``.

    ``expected_shapes``: the model's ``jax.eval_shape`` params tree. ``normalize``: a model-specific layout
    hook applied before the check (e.g. scanned ↔ unscanned layers). ``dtype``: cast floating leaves
    (None keeps the stored dtype). ``from_torch``: converter for PyTorch-format files (default: detect).
    ``drop_unexpected``: silently drop top-level/nested entries the model does not have (e.g. the VQGAN
    encoder when only the decoder is built); missing or mis-shaped entries always fail.
    """
    tree = read_checkpoint(path, from_torch=from_torch)
    tree = _strip_wrapper(tree, expected_shapes)
    if normalize is not None:
        tree = normalize(tree)
    if drop_unexpected:
        want = _flat(expected_shapes)
        tree = unflatten_dict({tuple(k.split("/")): v for k, v in _flat(tree).items() if k in want})
    check_tree(tree, expected_shapes, name=str(path))
    if dtype is not None:
        tree = cast_tree(tree, dtype)
    return jax.tree.map(jnp.asarray, tree)


# ----------------------------------------------------------------------------------------------
# Our own checkpoints
# ----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_params(path: str | Path, params: Any) -> Path:
    """Write a parameter tree as flax msgpack (HF ``flax_model.msgpack`` layout), atomically."""
    path = Path(path)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), _plain(params))
    _atomic_write(path, serialization.msgpack_serialize(host))
    return path


def save_safetensors(path: str | Path, params: Any) -> Path:
    """Write a parameter tree as flax-format safetensors (dotted names), atomically."""
    from safetensors.numpy import save

    path = Path(path)
    flat = {k.replace("/", "."): np.asarray(jax.device_get(v), order="C")
            for k, v in _flat(_plain(params)).items()}
    _atomic_write(path, save(flat, metadata={"format": "flax"}))
    return path


def restore_params(path: str | Path, expected_shapes: Any = None, *, dtype: Any = None) -> Tree:
    """Read back :func:`save_params` output; checked against ``expected_shapes`` when given."""
    if expected_shapes is None:
        tree = read_checkpoint(path)
        if dtype is not None:
            tree = cast_tree(tree, dtype)
        return jax.tree.map(jnp.asarray, tree)
    return load_params(path, expected_shapes, dtype=dtype)


def _plain(tree: Any) -> Any:
    return tree.unfreeze() if hasattr(tree, "unfreeze") else tree


def save_sharded(directory: str | Path, params: Any) -> Path:
    """Save a (possibly sharded) tree of ``jax.Array`` with orbax ``StandardCheckpointer`` (blocking)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory, _plain(params), force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    return directory


def restore_sharded(directory: str | Path, abstract_tree: Any) -> Any:
    """Restore :func:`save_sharded` output onto ``abstract_tree`` (``jax.ShapeDtypeStruct`` leaves, with
    ``sharding`` set to place each array; from ``jax.eval_shape``). Shapes are checked first."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(directory)
        stored = getattr(meta, "item_metadata", meta)
        stored = getattr(stored, "tree", stored)
        check_tree(jax.tree.map(lambda m: tuple(m.shape), dict(stored), is_leaf=lambda m: hasattr(m, "shape")),
                   abstract_tree, name=str(directory))
        return ckptr.restore(directory, _plain(abstract_tree))
    finally:
        ckptr.close()
