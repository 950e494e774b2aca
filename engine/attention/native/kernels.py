"""Our own C++ kernels for XLA:CPU, compiled on the user's machine the first time they are asked for.

Why: XLA:CPU runs the decode step's batched attention dots on one thread at 13-18 GB/s, about half of what two
cores stream (``bench/RESULTS.md``). ``decode_attention.cc`` holds the self- and cross-attention of one decode step
as XLA FFI custom calls: the (row, head) pairs split between the calling thread and XLA's own intra-op thread pool,
and only the written cache slots read.

The kernel is built with the system C++ compiler (``CXX``, else ``g++``) against the headers jaxlib ships
(``jax.ffi.include_dir()``), for this CPU (``-march=native``), into ``DALLE_NATIVE_CACHE`` (default
``~/.cache/dalle-bot/native``), keyed by the source, jaxlib's version, the compiler and the CPU's flags. Where no
compiler is found or the build fails, :func:`load` says why once and returns False, and the caller keeps XLA's
attention. :class:`engine.attention.native.NativeAttention` is the decode-attention backend over these calls; the
sampler picks it by default for float32 on CPU devices (:func:`engine.attention.select_backend`); on a mesh each
device runs the kernels on its own rows and heads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cc")
SELF_TARGET, CROSS_TARGET = "dalle_bot_decode_attention", "dalle_bot_cross_attention"  # XLA custom-call targets
TARGETS = {SELF_TARGET: "DalleBotDecodeAttention", CROSS_TARGET: "DalleBotCrossAttention"}  # -> handler symbols


class NativeBuildError(RuntimeError):
    """The kernel could not be compiled or loaded; the message says why (the compiler's own words included)."""


_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str, "lib": the loaded library (kept alive)


def cache_dir() -> Path:
    return Path(os.environ.get("DALLE_NATIVE_CACHE") or Path.home() / ".cache" / "dalle-bot" / "native")


def compiler() -> str | None:
    """The C++ compiler to build with: ``CXX`` if set, else ``g++``/``c++`` on PATH; None if there is none."""
    wanted = os.environ.get("CXX")
    if wanted:
        return shutil.which(wanted)
    return shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_key(cxx: str) -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jax.lib.__version__.encode(), cxx.encode(), _cpu_flags().encode(),
                 platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build(cxx: str | None = None) -> Path:
    """Compile the kernel (or find it already compiled) and return the shared library's path."""
    cxx = cxx or compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")
    out = cache_dir() / _build_key(cxx) / "libdalle_native.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17", "-w",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(target), "-lpthread"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeBuildError(f"{cxx} failed to run: {e}") from e
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise NativeBuildError(f"{cxx} failed (exit {done.returncode}):\n{tail}")
        os.replace(target, out)  # atomic: a concurrent builder finds either nothing or the whole library
    return out


def load(cxx: str | None = None) -> bool:
    """Build (first time), load and register the kernel with XLA; False (with one warning saying why) if it
    cannot be. Safe to call from several threads and many times."""
    with _lock:
        if "ok" not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(str(build(cxx)))
                for target, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _state.update(ok=True, lib=lib, why="")
            except (NativeBuildError, OSError, AttributeError) as e:
                _state.update(ok=False, why=str(e))
                log.warning("native decode attention unavailable, XLA's attention is used instead: %s", e)
        return bool(_state["ok"])


def unavailable_reason() -> str:
    """Why :func:`load` failed ("" if it did not, or was not called)."""
    return str(_state.get("why", ""))


def default_threads() -> int:
    """How many runs a kernel splits its (row, head) pairs into, for the calling thread and XLA's pool:
    ``DALLE_NATIVE_THREADS`` if set, else the cores this process may run on."""
    if os.environ.get("DALLE_NATIVE_THREADS"):
        return max(1, int(os.environ["DALLE_NATIVE_THREADS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _pair_specs(mesh: Mesh | AbstractMesh, heads: int) -> tuple[Any, Any]:
    """How the sampler splits the (row, head) pairs over a ("data", "model") mesh: rows over "data", heads over
    "model" where it divides them (as its KV cache). Returns the specs of q (B,1,H,Dh) and of (B,H,·,Dh) arrays."""
    from jax.sharding import PartitionSpec as P

    from engine.sharding import DATA, MODEL

    head_axis = MODEL if heads % mesh.shape[MODEL] == 0 else None
    return P(DATA, None, head_axis, None), P(DATA, head_axis, None, None)


def _one_query_per_row(q: jax.Array) -> tuple[int, int, int]:
    """(B, H, Dh) of q (B,1,H,Dh): a decode step's queries, one per row."""
    b, one, h, dh = q.shape
    if one != 1:
        raise ValueError(f"decode attention takes one query per row, got q of shape {q.shape}")
    return b, h, dh


def _threads_attr(threads: int | None) -> np.int64:
    """The kernels' ``threads`` attribute: ``threads``, else :func:`default_threads`."""
    return np.int64(threads or default_threads())


# (out (B,1,H,Dh), k_blocks, v_blocks)
Attended = tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]


def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, position: jax.Array,
                     k_blocks: Sequence[jax.Array], v_blocks: Sequence[jax.Array],
                     threads: int | None = None,
                     mesh: Mesh | AbstractMesh | None = None) -> Attended:
    """Write this step's key/value at ``position`` of a (blocked) float32 KV cache, then attend over slots
    ``0..position``: one decode step's self-attention.

    q (B,1,H,Dh) scaled queries; k_new, v_new (B,H,1,Dh); position: scalar int; k_blocks, v_blocks: per block
    (B,H,W,Dh), slot ``b·W + j`` in block b. Returns (out (B,1,H,Dh), k_blocks, v_blocks with the new slot
    written). The blocks go through the call in place (aliased): carried by a loop and only read by a custom
    call, XLA would otherwise copy every block before every step. :func:`load` must have returned True first.

    ``mesh``: a ("data", "model") mesh (:mod:`engine.sharding`) the arrays are spread over: each device then runs
    the kernel on its own rows and heads (``shard_map``), as the sampler's KV cache is split. Each (row, head)
    pair is computed the same way wherever it runs, so the result does not depend on the mesh.
    """
    if mesh is None:
        return _decode_attention_local(q, k_new, v_new, position, tuple(k_blocks), tuple(v_blocks), threads)
    from jax.sharding import PartitionSpec as P

    q_spec, pairs_spec = _pair_specs(mesh, q.shape[2])
    n = len(k_blocks)
    local = functools.partial(_decode_attention_local, threads=threads)
    mapped = jax.shard_map(
        local, mesh=mesh,
        in_specs=(q_spec, pairs_spec, pairs_spec, P(), (pairs_spec,) * n, (pairs_spec,) * n),
        out_specs=(q_spec, (pairs_spec,) * n, (pairs_spec,) * n),
        check_vma=False,  # a custom call: nothing for jax to check it against
    )
    return mapped(q, k_new, v_new, jnp.asarray(position, jnp.int32), tuple(k_blocks), tuple(v_blocks))


def _decode_attention_local(q: jax.Array, k_new: jax.Array, v_new: jax.Array, position: jax.Array,
                            k_blocks: tuple[jax.Array, ...], v_blocks: tuple[jax.Array, ...],
                            threads: int | None = None) -> Attended:
    """:func:`decode_attention` on arrays that all live on one device."""
    b, h, dh = _one_query_per_row(q)
    pairs = b * h
    blocks = [x.astype(jnp.float32) for x in (*k_blocks, *v_blocks)]
    call = jax.ffi.ffi_call(
        SELF_TARGET,
        (jax.ShapeDtypeStruct((pairs, dh), jnp.float32), *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in blocks)),
        input_output_aliases={4 + i: 1 + i for i in range(len(blocks))},
    )
    flat = [x.astype(jnp.float32).reshape(pairs, dh) for x in (q, k_new, v_new)]
    out, *written = call(*flat, jnp.asarray(position, jnp.int32).reshape(()), *blocks,
                         threads=_threads_attr(threads))
    n = len(k_blocks)
    return out.reshape(b, 1, h, dh), tuple(written[:n]), tuple(written[n:])


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, threads: int | None = None,
                    mesh: Mesh | AbstractMesh | None = None) -> jax.Array:
    """One decode step's cross-attention: q (B,1,H,Dh) scaled queries over each row's text keys and values k, v
    (B,H,T,Dh), with the additive mask bias (B,1,1,T) -> (B,1,H,Dh), in float32. ``mesh`` as for
    :func:`decode_attention`."""
    if mesh is None:
        return _cross_attention_local(q, k, v, bias, threads)
    from jax.sharding import PartitionSpec as P

    from engine.sharding import DATA

    q_spec, kv_spec = _pair_specs(mesh, q.shape[2])
    mapped = jax.shard_map(functools.partial(_cross_attention_local, threads=threads), mesh=mesh,
                           in_specs=(q_spec, kv_spec, kv_spec, P(DATA, None, None, None)), out_specs=q_spec,
                           check_vma=False)
    return mapped(q, k, v, bias)


def _cross_attention_local(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                           threads: int | None = None) -> jax.Array:
    """:func:`cross_attention` on arrays that all live on one device."""
    b, h, dh = _one_query_per_row(q)
    t = k.shape[2]
    call = jax.ffi.ffi_call(CROSS_TARGET, jax.ShapeDtypeStruct((b * h, dh), jnp.float32))
    f32 = [x.astype(jnp.float32) for x in (q, k, v, bias)]
    out = call(f32[0].reshape(b * h, dh), f32[1].reshape(b * h, t, dh), f32[2].reshape(b * h, t, dh),
               jnp.broadcast_to(f32[3], (b, 1, 1, t)).reshape(b, t), threads=_threads_attr(threads))
    return out.reshape(b, 1, h, dh)
