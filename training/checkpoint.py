"""Training checkpoints with orbax: the whole train state, its step and where the data source stands.

A checkpoint ``<dir>/<step>/`` holds two items: ``state`` (params, optimiser state, step, base rng key — any
pytree of arrays, sharded or not) and ``meta`` (JSON: step, data position, seed, optimiser config, anything
the trainer adds). Orbax writes to a temporary directory and renames it when complete, so a run killed during
a save leaves the previous checkpoint as the latest one.

Also here: :func:`export_flax_checkpoint`, which writes params in the published ``save_pretrained`` layout
(``config.json`` + ``flax_model.msgpack``) that the engine loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders for ``tree``: the restore target that keeps the live shardings."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype)

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves every ``save_every`` steps (0: only when forced), keeps the newest ``keep``, restores the latest."""

    def __init__(self, directory: str | Path, *, save_every: int = 0, keep: int = 3):
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Write ``state`` and ``meta`` as step ``step`` if due (or forced); returns whether it wrote."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        meta = {**meta, "step": int(step)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore into the structure, dtypes and shardings of ``target`` (arrays or ShapeDtypeStructs)."""
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else abstract_like(x), target
        )
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return restored.state, dict(restored.meta)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a checkpoint without loading its arrays."""
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export_flax_checkpoint(
    out_dir: str | Path, params: Any, config: dict[str, Any], *, extra_files: dict[str, bytes | str] | None = None
) -> Path:
    """Write ``config.json`` and ``flax_model.msgpack`` (HF ``save_pretrained`` layout) into ``out_dir``.

    Params are gathered to the host as numpy arrays first, so sharded trees export the same as local ones.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp = out / "flax_model.msgpack.tmp"
    tmp.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(host)))
    tmp.replace(out / "flax_model.msgpack")
    for name, content in (extra_files or {}).items():
        target = out / name
        if isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)
    return out


def export_trained(out_dir: str | Path, params: Any, config: dict[str, Any], result: Any,
                   metrics: dict[str, float]) -> Path:
    """Export a finished training run: the checkpoint (:func:`export_flax_checkpoint`) plus ``training.json``.

    ``result`` is the loop's ``TrainResult``; ``training.json`` records steps, eval metrics and throughput so an
    exported model says how it was made. The three trainers share this so their exports stay alike.
    """
    out = export_flax_checkpoint(out_dir, params, config)
    summary = {"steps": int(result.state.step), "eval": metrics, "examples_per_s": result.examples_per_s,
               "steps_per_s": result.steps_per_s}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def load_flax_params(path: str | Path) -> Any:
    """Read a ``flax_model.msgpack`` (file or directory holding one) into a nested dict of numpy arrays."""
    p = Path(path)
    if p.is_dir():
        p = p / "flax_model.msgpack"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such params file")
    return serialization.msgpack_restore(p.read_bytes())
