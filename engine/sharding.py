"""Device mesh, partition rules and multi-host start-up.

The engine uses one 2-D mesh with axes ``("data", "model")``:

* ``"model"`` splits DalleBart's large matrices Megatron-style (attention q/k/v and the GLU input
  projections on their output dimension, attention/GLU output projections on their input dimension,
  embeddings and ``lm_head`` on their vocabulary dimension), so a checkpoint that does not fit on one
  device (Mega) fits on several;
* ``"data"`` splits the candidate batch (and the KV cache's batch axis).

Rules are regular expressions over the slash-joined parameter path, so they apply to the published
parameter names in both the scanned layout (leading layer axis, which is never split) and the unscanned
one. A dimension that a mesh axis does not divide evenly (DALL·E mini's GLU width 2730, its 16385-row
decoder embedding) falls back to the rule's alternative spec, then to replication, so every published
checkpoint places on any mesh.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

P = PartitionSpec
DATA, MODEL = "data", "model"

# (regex on the path, preferred spec for the trailing dims, alternatives in order).
# Specs describe the *trailing* dimensions; leading (scan) dimensions are left unsplit.
_DALLEBART_RULES: tuple[tuple[str, tuple[PartitionSpec, ...]], ...] = (
    (r"(q_proj|k_proj|v_proj)/kernel$", (P(None, MODEL), P(MODEL, None))),
    (r"out_proj/kernel$", (P(MODEL, None), P(None, MODEL))),
    (r"GLU_0/Dense_[01]/kernel$", (P(None, MODEL), P(MODEL, None))),
    (r"GLU_0/Dense_2/kernel$", (P(MODEL, None), P(None, MODEL))),
    (r"FFN_0/Dense_0/kernel$", (P(None, MODEL), P(MODEL, None))),
    (r"FFN_0/Dense_1/kernel$", (P(MODEL, None), P(None, MODEL))),
    (r"lm_head/kernel$", (P(None, MODEL), P(MODEL, None))),
    (r"embed_tokens/embedding$", (P(MODEL, None), P(None, MODEL))),
    (r"embed_positions/embedding$", (P(None, MODEL),)),
)


@dataclass(frozen=True)
class MeshShape:
    data: int
    model: int


def make_mesh(model_parallel: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: all, across every host).

    ``model_parallel`` devices share each model replica; the rest of the devices replicate it and split
    the batch. Axis types are ``Auto`` so jit in/out shardings and sharding constraints behave as GSPMD.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if model_parallel < 1 or n % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must divide the device count {n}")
    grid = np.asarray(devices, dtype=object).reshape(n // model_parallel, model_parallel)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fits(spec: PartitionSpec, shape: tuple[int, ...], axis_sizes: Mapping[str, int]) -> bool:
    if len(spec) > len(shape):
        return False
    trailing = shape[len(shape) - len(spec) :]
    for dim, axis in zip(trailing, spec, strict=True):
        if axis is not None and dim % axis_sizes[axis]:
            return False
    return True


def spec_for(path: str, shape: tuple[int, ...], axis_sizes: Mapping[str, int], rules=_DALLEBART_RULES) -> PartitionSpec:
    """The partition spec of one parameter: the first rule that matches and divides evenly, else replicated."""
    for pattern, candidates in rules:
        if re.search(pattern, path):
            for cand in candidates:
                if _fits(cand, shape, axis_sizes):
                    return P(*([None] * (len(shape) - len(cand))), *cand)
            log.debug("replicating %s %s: no candidate spec divides it", path, shape)
            return P()
    return P()


def param_specs(params: Any, mesh: Mesh, rules=_DALLEBART_RULES) -> Any:
    """A pytree of ``PartitionSpec`` matching ``params`` (arrays or ``ShapeDtypeStruct``)."""
    sizes = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(lambda p, x: spec_for(_path_str(p), tuple(x.shape), sizes, rules), params)


def param_shardings(params: Any, mesh: Mesh, rules=_DALLEBART_RULES) -> Any:
    """``NamedSharding`` for every parameter, for ``jax.device_put`` or jit ``in_shardings``."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules))


def shard_params(params: Any, mesh: Mesh, rules=_DALLEBART_RULES) -> Any:
    """Place ``params`` on ``mesh`` according to the rules (host arrays are copied once)."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over ``"data"``, everything else replicated."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Join a multi-host JAX job (``jax.distributed.initialize``) when configured; returns whether it did.

    Values come from the arguments or from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With none of them set this is a single-process run and nothing happens. Must be
    called before the first JAX computation. Afterwards ``jax.devices()`` lists every process's devices, so
    :func:`make_mesh` builds the global mesh; every process must then make the same sampler calls. On CPU the
    cross-process collectives run over gloo (jax 0.10.2's default ``jax_cpu_collectives_implementation``);
    ``tests/engine/test_multihost.py`` runs two such processes on 127.0.0.1.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if not coordinator_address:
        return False
    if num_processes is None or process_id is None:
        raise ValueError("multi-host start-up needs JAX_NUM_PROCESSES and JAX_PROCESS_ID with the coordinator")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
    )
    log.info("joined JAX job: process %d of %d, %d global devices", process_id, num_processes, jax.device_count())
    return True
