"""The compiled sampling programs and where their arrays live (see :mod:`engine.sampling`).

Speed: the encoder and the cross-attention K/V run once per call and once per distinct text (a 9-candidate request
encodes its prompt and the unconditional text, 2 rows, not 18; see :func:`distinct_texts`); the self-attention K/V
cache is static, one ``(2B, H, image_length, Dh)`` array per layer, written in place (write-then-read, so XLA never
copies it), or in blocks of which the steps of block k read blocks 0..k only (the attention backend's default:
:func:`engine.attention.xla.default_cache_blocks`); the whole step loop is one ``lax.scan`` per cache block inside
one ``jax.jit`` (or a few chunks of it when a progress hook is given); params are jit arguments, never constants;
top-k ranks with ``lax.top_k`` instead of a sort when it can. Decoding uses the unscanned (per-layer) param
layout: measured faster than slicing stacked kernels in a scan. Programs are compiled ahead of time per (bucket,
text length, dtype; the encoder also per number of distinct texts) and shared by samplers of one config and
attention backend (:mod:`engine.attention`: XLA's einsums, or our C++ kernels for float32 on CPU devices).

Sharding (``Sampler(..., mesh=...)``, see :mod:`engine.sharding`): params are split over the mesh's ``"model"``
axis by the Megatron rules; the candidate rows, the KV cache's and cross K/V's batch axis and the per-row inputs
over ``"data"`` (the bucket is padded to a multiple of the data-axis size; interleaving keeps a candidate's
cond/uncond pair on one device); the cache and cross K/V also split their heads over ``"model"`` when it divides
them; the distinct texts are encoded replicated, then gathered into the rows. Every program is jitted with
explicit ``in_shardings``/``out_shardings`` and compiled under the mesh (``jax.set_mesh``), where the native
attention backend maps its kernels over the devices; sampled tokens (and logits) come out replicated, so every
process of a multi-host job reads them to its host. Without a mesh nothing of this runs.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine import sharding as shd
from engine.attention import XLA, AttentionBackend
from engine.config import DalleBartConfig
from engine.models.dallebart import DalleBart, param_shapes
from engine.models.layout import map_kernels
from engine.sampling.logits import candidate_keys, sample_tokens


def device_platform(mesh: Mesh | None = None) -> str:
    """The platform ("cpu", "gpu", ...) the sampler runs on: the mesh's devices, else the default device's."""
    devices = mesh.devices.flat if mesh is not None else jax.devices()
    return next(iter(devices)).platform


def default_transposed_kernels(mesh: Mesh | None = None) -> bool:
    """Whether the sampler should decode with transposed kernels: on CPU devices (XLA:CPU streams the left GEMM
    operand as stored, see :func:`to_decode_layout`), not on accelerators, where the transposes around every
    dense layer would be extra kernels in each step."""
    return device_platform(mesh) == "cpu"


def _transposed_sharding(s: NamedSharding) -> NamedSharding:
    """The sharding of a 2-D kernel's transpose (an empty spec, i.e. replicated, stays replicated)."""
    spec = tuple(s.spec) + (None,) * (2 - len(s.spec))
    if len(spec) != 2:
        raise ValueError(f"decode layout: kernel spec {s.spec} is not 2-D")
    return NamedSharding(s.mesh, PartitionSpec(spec[1], spec[0]))


def distinct_texts(
    enc_ids: np.ndarray, enc_mask: np.ndarray, uncond_ids: np.ndarray, uncond_mask: np.ndarray, max_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (ids, mask) texts among B candidates' prompts and unconditional texts, so that each is encoded
    (and its cross-attention K/V projected) once per pass instead of once per candidate: a 9-candidate request has
    2 texts, not 18 rows.

    Returns ids and mask (U, T), U the number of distinct texts rounded up to a power of two >= 2 (at most
    ``max_size`` >= 2B; padded by repeating the first text) so that few encoder programs exist, and ``row`` (B, 2)
    int32: the texts of each candidate's prompt and of its unconditional text.
    """
    b, t = enc_ids.shape
    texts = np.stack([np.concatenate([enc_ids, enc_mask], axis=1), np.concatenate([uncond_ids, uncond_mask], axis=1)],
                     axis=1).reshape(2 * b, 2 * t)
    unique, row = np.unique(texts, axis=0, return_inverse=True)
    size = min(max(2, 1 << (len(unique) - 1).bit_length()), max_size)
    unique = np.concatenate([unique, np.repeat(unique[:1], size - len(unique), axis=0)])
    return unique[:, :t], unique[:, t:], row.reshape(b, 2).astype(np.int32)


def text_sizes(bucket: int) -> list[int]:
    """Every text count :func:`distinct_texts` can give for a ``bucket``-row pass (2 per candidate at most)."""
    top = 2 * bucket
    return sorted({min(1 << k, top) for k in range(1, top.bit_length() + 1)})


@dataclasses.dataclass
class RowParams:
    """Per-row inputs after padding to the bucket (numpy, host side)."""

    text_row: np.ndarray  # (B, 2): the pass's distinct texts that are the candidate's prompt and unconditional text
    seed_hi: np.ndarray
    seed_lo: np.ndarray
    indices: np.ndarray
    scale: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    temperature: np.ndarray
    prefix: np.ndarray  # (B, image_length): the tokens a row is forced to start with (zeros past its length)
    prefix_len: np.ndarray  # (B,): how many of them it keeps (0: none; every position is sampled)


class Programs:
    """The traced sampling functions for one (decode config, dtype); jitted once and shared by every Sampler.

    They depend on shapes, config and dtype only (params are arguments), so samplers of different checkpoints
    with the same config reuse the compiled programs.
    """

    def __init__(self, config: DalleBartConfig, dtype: Any, mesh: Mesh | None = None, cache_blocks: int = 1,
                 attention: AttentionBackend = XLA) -> None:
        if cache_blocks < 1 or config.image_length % cache_blocks:
            raise ValueError(f"cache_blocks must divide image_length {config.image_length}, got {cache_blocks}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.cache_blocks = cache_blocks
        self.attention = attention
        self.model = DalleBart(config, dtype=self.dtype, attention=attention)
        if mesh is None:
            self.encode_jit = jax.jit(self.encode)
            self.prepare_jit = jax.jit(self.prepare)
            self.chunk_jit = jax.jit(self.chunk, static_argnames=("pieces", "collect"), donate_argnums=(1,))
            self._jitted = {"encode": self.encode_jit, "prepare": self.prepare_jit, "chunk": self.chunk_jit}
        else:
            # jit refuses keyword (static) arguments together with in_shardings: bind them with partial instead
            s = self.shardings = MeshShardings.build(config, mesh, cache_blocks)
            rows = s.rows
            self.encode_jit = jax.jit(
                self.encode, in_shardings=(s.params, s.replicated, s.replicated), out_shardings=s.texts_kv,
            )
            self.prepare_jit = jax.jit(
                self.prepare,
                in_shardings=(s.texts_kv, s.replicated, rows["text_row"], rows["seed_hi"], rows["seed_lo"],
                              rows["indices"], rows["prefix"], rows["prefix_len"]),
                out_shardings=s.state,
            )
            self._mesh_jit = {
                "encode": lambda: self.encode_jit,
                "prepare": lambda: self.prepare_jit,
                "chunk": lambda **static: jax.jit(
                    functools.partial(self.chunk, **static), donate_argnums=(1,),
                    in_shardings=(s.params, s.state, s.replicated, rows["scale"], rows["top_k"], rows["top_p"],
                                  rows["temperature"]),
                    out_shardings=(s.state, s.replicated, s.replicated),
                ),
            }
        self._executables: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def executable(self, name: str, *args: Any, **static: Any) -> Any:
        """The compiled program for ``name`` at these argument shapes (arrays or ShapeDtypeStructs), cached.

        Compiling ahead of time (see :meth:`Sampler.warmup`) and running the cached executable means a request
        never waits for a compile once its bucket is warm.
        """
        leaves, treedef = jax.tree.flatten(args)
        key = (name, tuple(sorted(static.items())), treedef, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves))
        with self._lock:
            exe = self._executables.get(key)
            if exe is None:
                if self.mesh is None:
                    exe = self._jitted[name].lower(*args, **static).compile()
                else:  # traced under the mesh, where a backend may map its kernels over the devices
                    with jax.set_mesh(self.mesh):
                        exe = self._mesh_jit[name](**static).lower(*args).compile()
                self._executables[key] = exe
        return exe

    def call(self, name: str, *args: Any, **static: Any) -> Any:
        return self.executable(name, *args, **static)(*args)

    @property
    def num_compiled(self) -> int:
        return len(self._executables)

    def encode(self, params, text_ids, text_mask) -> Any:
        """The cross-attention K/V (per layer (U,H,T,Dh)) of a pass's U distinct texts (U,T): a program per U,
        shared by every batch bucket."""
        variables = {"params": params}
        hidden = self.model.apply(variables, text_ids, text_mask, method=DalleBart.encode)
        return self.model.apply(variables, hidden, method=DalleBart.cross_kv)

    def prepare(self, text_kv, text_mask, text_row, seed_hi, seed_lo, indices, prefix, prefix_len):
        """The decode state: every decoder row (interleaved: 2i candidate i's prompt, 2i+1 its unconditional text,
        per ``text_row`` (B,2)) gets its text's cross K/V and mask; an empty cache; the row keys; the row's forced
        token prefix (arrays, so rows with and without one share the compiled loop)."""
        b = text_row.shape[0]
        rows = text_row.reshape(2 * b)
        return {
            "cache": self.model.init_cache(2 * b, self.dtype, blocks=self.cache_blocks),
            "cross": jax.tree.map(lambda x: jnp.take(x, rows, axis=0), text_kv),
            "mask": jnp.take(text_mask, rows, axis=0),
            "token": jnp.full((b,), self.config.decoder_start_token_id, jnp.int32),
            "keys": jax.random.key_data(candidate_keys(seed_hi, seed_lo, indices)),
            "prefix": prefix,
            "prefix_len": prefix_len,
        }

    def pieces(self, start: int, n_steps: int) -> tuple[tuple[int, int], ...]:
        """Steps ``start .. start+n_steps-1`` split at the cache's block boundaries: ((segment, steps), ...), the
        static shape of a chunk program (one loop per piece; a cache of one block has segment 0 throughout)."""
        width = self.config.image_length // self.cache_blocks
        out, pos, end = [], start, start + n_steps
        while pos < end:
            segment = pos // width
            steps = min(end, (segment + 1) * width) - pos
            out.append((segment, steps))
            pos += steps
        return tuple(out)

    def chunk(self, params, state, start, scale, top_k, top_p, temperature, *, pieces: tuple[tuple[int, int], ...],
              collect: bool):
        """Run the decoder steps of ``pieces`` (:meth:`pieces`) from position ``start``; returns (state, tokens (B,n),
        [logits]). Each piece is one loop whose steps write and read the cache blocks of its segment and before."""
        n_codes = self.config.num_image_codes
        keys = jax.random.wrap_key_data(state["keys"], impl="threefry2x32")
        variables = {"params": params}

        def step(segment, carry, position):
            cache, token = carry
            logits, cache = self.model.apply(
                variables, jnp.repeat(token, 2), position, cache, state["cross"], state["mask"],
                None if self.cache_blocks == 1 else segment, method=DalleBart.decode_step,
            )
            pair = logits[:, :n_codes].reshape(token.shape[0], 2, n_codes)
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, position.astype(jnp.uint32))
            token = sample_tokens(step_keys, pair[:, 0], pair[:, 1], scale, temperature, top_k, top_p)
            # a row's first prefix_len positions take its given tokens: what the next step is conditioned on
            forced = jax.lax.dynamic_index_in_dim(state["prefix"], position, axis=1, keepdims=False)
            token = jnp.where(position < state["prefix_len"], forced, token)
            return (cache, token), ((token, logits) if collect else (token, None))

        carry, token_parts, logit_parts, offset = (state["cache"], state["token"]), [], [], 0
        for segment, n_steps in pieces:
            positions = start + offset + jnp.arange(n_steps, dtype=jnp.int32)
            carry, (tokens, logits) = jax.lax.scan(functools.partial(step, segment), carry, positions)
            token_parts.append(tokens)
            logit_parts.append(logits)
            offset += n_steps
        cache, token = carry
        state = dict(state, cache=cache, token=token)
        tokens = jnp.concatenate(token_parts, axis=0)
        logits = None if not collect else jnp.concatenate(logit_parts, axis=0)
        return state, tokens.T, (None if logits is None else jnp.swapaxes(logits, 0, 1))


@dataclasses.dataclass(frozen=True)
class MeshShardings:
    """Where every input, state array and output of the sampling programs lives on a ("data", "model") mesh."""

    params: Any  # NamedSharding per parameter (engine.sharding rules), unscanned, in the sampler's kernel layout
    rows: dict[str, NamedSharding]  # per-row inputs: batch axis over "data"
    state: dict[str, Any]  # cache / cross K/V, per layer (2B, H, S|T, Dh): 2B over "data", H over "model" if it divides
    replicated: NamedSharding  # scalars and the outputs (tokens, logits), readable on every host
    texts_kv: Any  # cross K/V of the distinct texts, per layer (U, H, T, Dh): replicated but for H as in ``state``

    @classmethod
    def build(cls, config: DalleBartConfig, mesh: Mesh, cache_blocks: int = 1) -> MeshShardings:
        heads = config.decoder_attention_heads
        head_axis = shd.MODEL if heads % mesh.shape[shd.MODEL] == 0 else None
        kv = (NamedSharding(mesh, PartitionSpec(shd.DATA, head_axis, None, None)),) * config.decoder_layers
        cache_kv = kv if cache_blocks == 1 else tuple((k,) * cache_blocks for k in kv)
        texts_kv = (NamedSharding(mesh, PartitionSpec(None, head_axis, None, None)),) * config.decoder_layers
        rows = {f.name: shd.batch_sharding(mesh, 2 if f.name in ("text_row", "prefix") else 1)
                for f in dataclasses.fields(RowParams)}
        state = {
            "cache": {"k": cache_kv, "v": cache_kv},
            "cross": (kv, kv),
            "mask": shd.batch_sharding(mesh, 2),
            "token": shd.batch_sharding(mesh, 1),
            "keys": shd.batch_sharding(mesh, 2),
            "prefix": shd.batch_sharding(mesh, 2),
            "prefix_len": shd.batch_sharding(mesh, 1),
        }
        published = dataclasses.replace(config, transposed_kernels=False)  # the rules name (in, out) kernels
        params = shd.param_shardings(param_shapes(published), mesh)
        if config.transposed_kernels:
            params = map_kernels(_transposed_sharding, params)
        return cls(params, rows, state, shd.replicated(mesh), (texts_kv, texts_kv))


@functools.lru_cache(maxsize=16)
def programs_for(config: DalleBartConfig, dtype_name: str, mesh: Mesh | None = None, cache_blocks: int = 1,
              attention: AttentionBackend = XLA) -> Programs:
    return Programs(config, jnp.dtype(dtype_name), mesh, cache_blocks, attention)
