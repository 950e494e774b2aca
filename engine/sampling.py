"""Sampling engine: all ``image_length`` image tokens for a batch of candidates in one jitted loop.

Per candidate row ``i`` the decoder runs two branches, conditional (the prompt) and unconditional (the empty
prompt), stacked in ONE batch of ``2B`` decoder rows, interleaved ``[c0, u0, c1, u1, ...]`` so that sharding the
batch axis keeps a candidate's pair on one device. Each step (see :func:`process_logits`):

    logits = uncond + scale · (cond − uncond)             # super-conditioning, float32
    logits = logits[:num_image_codes] / temperature        # never emit start/padding ids
    keep the top_k largest (0 = off), then the smallest nucleus with mass >= top_p (1.0 = off)
    token  = a draw from what is kept with key fold_in(fold_in(key(seed), index), step)  (see sample_tokens)

The random stream of a candidate depends only on ``(seed, index)``, so a candidate gets the same tokens alone or
batched with other requests, in any row, at any batch bucket. Sampling parameters are per-row arrays: rows of
different requests share one compiled program.

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
explicit ``in_shardings``/``out_shardings``; sampled tokens (and logits) come out replicated, so every process of
a multi-host job reads them to its host. Without a mesh nothing of this runs.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine import sharding as shd
from engine.api import DEFAULT_BUCKETS, bucket_for
from engine.attention import XLA, AttentionBackend, select_backend
from engine.config import DalleBartConfig
from engine.models.dallebart import DalleBart, param_shapes
from engine.models.layout import map_kernels, normalize_layout, to_decode_layout

ChunkHook = Callable[[int, np.ndarray], Any]


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


FAST_TOP_K = 256  # rows with top_k <= this are filtered with lax.top_k instead of a full sort (≈30× cheaper)


def _nucleus_ranks(ranked: jax.Array, k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per rank of the descending values ``ranked`` (B,W): (within top-k, within the nucleus over the top-k
    survivors, i.e. the mass of the ranks before it, renormalised over the top k, is < top_p: the first always)."""
    w = ranked.shape[-1]
    in_k = jnp.arange(w)[None, :] < jnp.clip(k, 1, w)[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return in_k, in_k & (mass_before < top_p[:, None])


def _filter_ranked(x: jax.Array, ranked: jax.Array, k: jax.Array, top_k_on: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p on x (B,V) given its W largest values per row, descending (W >= every active k)."""
    k = jnp.clip(k, 1, ranked.shape[-1])
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    x = jnp.where(top_k_on[:, None] & (x < kth), -jnp.inf, x)
    n_keep = jnp.maximum(jnp.sum(_nucleus_ranks(ranked, k, top_p)[1], axis=-1), 1)
    threshold = jnp.take_along_axis(ranked, (n_keep - 1)[:, None], axis=-1)
    return jnp.where((top_p < 1.0)[:, None] & (x < threshold), -jnp.inf, x)


def _guided(cond: jax.Array, uncond: jax.Array, scale: jax.Array, temperature: jax.Array) -> jax.Array:
    """(B,V) float32 ``(uncond + scale·(cond − uncond)) / temperature``."""
    cond = cond.astype(jnp.float32)
    uncond = uncond.astype(jnp.float32)
    x = uncond + scale.astype(jnp.float32)[:, None] * (cond - uncond)
    return x / temperature.astype(jnp.float32)[:, None]


def _filter(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    v = x.shape[-1]
    top_k = top_k.astype(jnp.int32)
    top_p = top_p.astype(jnp.float32)
    top_k_on = (top_k > 0) & (top_k < v)
    k = jnp.where(top_k_on, top_k, v)
    fast_width = min(FAST_TOP_K, v)
    # a row fits the fast path if its top-k is small, or if it filters nothing at all
    fits = (top_k_on & (top_k <= fast_width)) | (~top_k_on & (top_p >= 1.0))
    return jax.lax.cond(
        jnp.all(fits),
        lambda: _filter_ranked(x, jax.lax.top_k(x, fast_width)[0], k, top_k_on, top_p),
        lambda: _filter_ranked(x, -jnp.sort(-x, axis=-1), k, top_k_on, top_p),
    )


def process_logits(
    cond: jax.Array,
    uncond: jax.Array,
    scale: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """Super-conditioning, temperature, top-k and top-p on one step's logits (in that order, as the reference).

    cond, uncond: (B,V) logits of the two branches (any float dtype); scale, temperature, top_p: (B,) float;
    top_k: (B,) int (0 or >= V = off); top_p >= 1 = off. Returns (B,V) float32 logits, ``-inf`` outside the kept
    set. Ties at the top-k / top-p threshold are kept. When every row's filter fits in the ``FAST_TOP_K`` largest
    values, only those are ranked (``lax.top_k``); otherwise the rows are fully sorted.
    """
    return _filter(_guided(cond, uncond, scale, temperature), top_k, top_p)


RANK_WIDTHS = (16, 64, 256)  # lax.top_k widths for rank sampling; the narrowest that covers the batch's top-k


def _ranked_tokens(x: jax.Array, noise: jax.Array, k: jax.Array, top_p: jax.Array, width: int) -> jax.Array:
    """Gumbel-max over each row's ``width`` largest logits, after top-k (``k`` <= width) and top-p on them.

    ``noise`` (B, RANK_WIDTHS[-1]) is indexed by rank, so the token does not depend on ``width``."""
    vals, idx = jax.lax.top_k(x, width)
    in_k, nucleus = _nucleus_ranks(vals, k, top_p)
    keep = jnp.where((top_p >= 1.0)[:, None], in_k, nucleus)
    j = jnp.argmax(jnp.where(keep, vals, -jnp.inf) + noise[:, :width], axis=-1)
    return jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]


def sample_tokens(
    keys: jax.Array,
    cond: jax.Array,
    uncond: jax.Array,
    scale: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One step's tokens (B,) int32: :func:`process_logits` followed by a draw with each row's key.

    A row with top-k on (``1 <= top_k <= RANK_WIDTHS[-1]``) draws by rank: Gumbel noise for the ranks
    ``0..RANK_WIDTHS[-1]-1`` from its key, maximised over its kept ranks among the batch's narrowest sufficient
    ``lax.top_k`` width — a top-k of 16 ranks 16 of the logits instead of 256 and draws 256 Gumbels instead of V
    (measured 25× cheaper per step at 16 rows and V = 1025). Any other row (top-k off, or wider) draws
    ``categorical`` over all V codes after :func:`process_logits`; that pass runs only when such a row exists.
    Either way a row's token depends only on its own key, logits and parameters, never on the other rows.
    """
    x = _guided(cond, uncond, scale, temperature)
    v = x.shape[-1]
    top_k = top_k.astype(jnp.int32)
    top_p = top_p.astype(jnp.float32)
    widths = [w for w in RANK_WIDTHS if w < v]
    ranked = (top_k > 0) & (top_k <= (widths[-1] if widths else 0))
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (RANK_WIDTHS[-1],)))(keys)

    def full() -> jax.Array:
        return jax.vmap(jax.random.categorical)(keys, _filter(x, top_k, top_p)).astype(jnp.int32)

    if not widths:
        return full()
    k_max = jnp.max(jnp.where(ranked, top_k, 1))
    branch = jnp.searchsorted(jnp.asarray(widths), k_max)  # the narrowest width >= every ranked row's k
    by_rank = jax.lax.switch(branch, [functools.partial(_ranked_tokens, width=w) for w in widths],
                             x, noise, top_k, top_p).astype(jnp.int32)
    other = jax.lax.cond(jnp.all(ranked), lambda: by_rank, full)
    return jnp.where(ranked, by_rank, other)


def candidate_keys(seed_hi: jax.Array, seed_lo: jax.Array, index: jax.Array) -> jax.Array:
    """Per-candidate base keys ``fold_in(key(seed), index)``; seed split into uint32 halves (equals PRNGKey(seed))."""
    data = jnp.stack([seed_hi.astype(jnp.uint32), seed_lo.astype(jnp.uint32)], axis=-1)
    base = jax.random.wrap_key_data(data, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(base, index.astype(jnp.uint32))


def split_seeds(seeds: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Python/numpy seeds in [0, 2**64) -> (hi, lo) uint32 arrays."""
    s = np.asarray([int(x) for x in np.ravel(seeds)], dtype=object)
    if any(x < 0 or x >= 2**64 for x in s):
        raise ValueError("seeds must be in [0, 2**64)")
    hi = np.asarray([x >> 32 for x in s], dtype=np.uint32)
    lo = np.asarray([x & 0xFFFFFFFF for x in s], dtype=np.uint32)
    return hi, lo


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
class _RowParams:
    """Per-row inputs after padding to the bucket (numpy, host side)."""

    text_row: np.ndarray  # (B, 2): the pass's distinct texts that are the candidate's prompt and unconditional text
    seed_hi: np.ndarray
    seed_lo: np.ndarray
    indices: np.ndarray
    scale: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    temperature: np.ndarray


class _Programs:
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
            s = self.shardings = _MeshShardings.build(config, mesh, cache_blocks)
            rows = s.rows
            self.encode_jit = jax.jit(
                self.encode, in_shardings=(s.params, s.replicated, s.replicated), out_shardings=s.texts_kv,
            )
            self.prepare_jit = jax.jit(
                self.prepare,
                in_shardings=(s.texts_kv, s.replicated, rows["text_row"], rows["seed_hi"], rows["seed_lo"],
                              rows["indices"]),
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

    def prepare(self, text_kv, text_mask, text_row, seed_hi, seed_lo, indices):
        """The decode state: every decoder row (interleaved: 2i candidate i's prompt, 2i+1 its unconditional text,
        per ``text_row`` (B,2)) gets its text's cross K/V and mask; an empty cache; the row keys."""
        b = text_row.shape[0]
        rows = text_row.reshape(2 * b)
        return {
            "cache": self.model.init_cache(2 * b, self.dtype, blocks=self.cache_blocks),
            "cross": jax.tree.map(lambda x: jnp.take(x, rows, axis=0), text_kv),
            "mask": jnp.take(text_mask, rows, axis=0),
            "token": jnp.full((b,), self.config.decoder_start_token_id, jnp.int32),
            "keys": jax.random.key_data(candidate_keys(seed_hi, seed_lo, indices)),
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
class _MeshShardings:
    """Where every input, state array and output of the sampling programs lives on a ("data", "model") mesh."""

    params: Any  # NamedSharding per parameter (engine.sharding rules), unscanned, in the sampler's kernel layout
    rows: dict[str, NamedSharding]  # per-row inputs: batch axis over "data"
    state: dict[str, Any]  # cache / cross K/V, per layer (2B, H, S|T, Dh): 2B over "data", H over "model" if it divides
    replicated: NamedSharding  # scalars and the outputs (tokens, logits), readable on every host
    texts_kv: Any  # cross K/V of the distinct texts, per layer (U, H, T, Dh): replicated but for H as in ``state``

    @classmethod
    def build(cls, config: DalleBartConfig, mesh: Mesh, cache_blocks: int = 1) -> _MeshShardings:
        heads = config.decoder_attention_heads
        head_axis = shd.MODEL if heads % mesh.shape[shd.MODEL] == 0 else None
        kv = (NamedSharding(mesh, PartitionSpec(shd.DATA, head_axis, None, None)),) * config.decoder_layers
        cache_kv = kv if cache_blocks == 1 else tuple((k,) * cache_blocks for k in kv)
        texts_kv = (NamedSharding(mesh, PartitionSpec(None, head_axis, None, None)),) * config.decoder_layers
        rows = {f.name: shd.batch_sharding(mesh, 2 if f.name == "text_row" else 1)
                for f in dataclasses.fields(_RowParams)}
        state = {
            "cache": {"k": cache_kv, "v": cache_kv},
            "cross": (kv, kv),
            "mask": shd.batch_sharding(mesh, 2),
            "token": shd.batch_sharding(mesh, 1),
            "keys": shd.batch_sharding(mesh, 2),
        }
        published = dataclasses.replace(config, transposed_kernels=False)  # the rules name (in, out) kernels
        params = shd.param_shardings(param_shapes(published), mesh)
        if config.transposed_kernels:
            params = map_kernels(_transposed_sharding, params)
        return cls(params, rows, state, shd.replicated(mesh), (texts_kv, texts_kv))


@functools.lru_cache(maxsize=16)
def _programs(config: DalleBartConfig, dtype_name: str, mesh: Mesh | None = None, cache_blocks: int = 1,
              attention: AttentionBackend = XLA) -> _Programs:
    return _Programs(config, jnp.dtype(dtype_name), mesh, cache_blocks, attention)


class Sampler:
    """Samples image tokens for batches of candidates with a DalleBart; one compiled program per bucket.

    ``Sampler(model, params, config, dtype=jnp.float32, *, buckets=DEFAULT_BUCKETS, chunk_size=32, mesh=None,
    transposed_kernels=None, eager_text_programs=True)``: ``model`` may be None or a :class:`DalleBart` (only its
    ``dtype`` is used when ``dtype`` is None); ``params`` in either published layout (converted once to the
    unscanned layout, with transposed kernels where ``transposed_kernels`` — default
    :func:`default_transposed_kernels`: on CPU — see :func:`to_decode_layout`, and cast to ``dtype``).
    ``chunk_size`` is the number of steps per jitted chunk when a progress hook is given. ``mesh``: a
    ``("data", "model")`` mesh from :func:`engine.sharding.make_mesh` (possibly spanning several processes); params
    are then placed on it by the :mod:`engine.sharding` rules (never whole on one device) and candidates split
    over ``"data"``.
    ``eager_text_programs``: the first pass of a batch size compiles the encoder and state programs for every
    number of distinct texts it can hold (:meth:`_compile_text_programs`), so no later pass of that size compiles;
    False compiles only the count a pass needs, when it first comes (for callers that send one request at a time).
    ``cache_blocks``: the KV cache in that many blocks along the positions (default: the attention backend's,
    :func:`engine.attention.xla.default_cache_blocks` for XLA's, 1 for the native kernels, which read only the
    written slots), so a step reads only the blocks written so far; a chunk that spans blocks runs one loop per
    block.
    ``native_attention``: which backend computes the decode step's self- and cross-attention
    (:func:`engine.attention.select_backend`): None (the default) our C++ kernels wherever they apply (float32 on
    CPU devices; on a mesh each device runs them on its own rows and heads), else XLA's attention; True the kernels
    (a ValueError where they do not apply); False XLA's attention. Where the kernels cannot be built, a warning
    says why and XLA's attention is used. ``self.attention`` is the backend chosen, ``self.attention.name`` its
    name ("native" or "xla"). Their logits agree to float rounding, not bit for bit, so the same seed can give a
    different image with one and with the other (rarely); with either, the same image alone or batched, on one
    device or a mesh.
    Every process of a multi-host job must make the same calls with the same arguments.
    """

    def __init__(
        self,
        model: DalleBart | None,
        params: Any,
        config: DalleBartConfig,
        dtype: Any = None,
        *,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        chunk_size: int = 32,
        mesh: Mesh | None = None,
        transposed_kernels: bool | None = None,
        eager_text_programs: bool = True,
        cache_blocks: int | None = None,
        native_attention: bool | None = None,
    ) -> None:
        if dtype is None:
            dtype = model.dtype if model is not None else jnp.float32
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.attention = select_backend(native_attention, self.dtype, device_platform(mesh))
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.chunk_size = max(1, min(int(chunk_size), config.image_length))
        self.eager_text_programs = bool(eager_text_programs)
        if transposed_kernels is None:
            transposed_kernels = default_transposed_kernels(mesh)
        self.transposed_kernels = bool(transposed_kernels)
        self._decode_config = dataclasses.replace(
            config, use_scan=False, gradient_checkpointing=False, transposed_kernels=self.transposed_kernels,
        )
        self.mesh = mesh
        if cache_blocks is None:
            cache_blocks = self.attention.cache_blocks(config)
        self.cache_blocks = int(cache_blocks)
        self._progs = _programs(self._decode_config, self.dtype.name, mesh, self.cache_blocks, self.attention)
        # (rows, text length) whose text programs are compiled -> the shape of their decode state
        self._state_shapes: dict[tuple[int, int], Any] = {}
        self.model = self._progs.model
        tree = params["params"] if set(params) == {"params"} else params
        tree = normalize_layout(tree, self._decode_config)  # published kernels (transposed below where chosen)
        # the decode copy (cast, kernels transposed or not) is made leaf by leaf: the weights exist twice only until
        # the caller drops the published ones, as they did before when loading from the file
        t = self.transposed_kernels
        if mesh is None:
            self.params = to_decode_layout(tree, self.dtype, transpose=t)  # numpy trees too: on the device
            self._data_size = 1
        else:
            # cast and transpose on the host, then place sharded
            host = to_decode_layout(tree, self.dtype, host=True, transpose=t)
            want = jax.tree.structure(self._progs.shardings.params)
            if jax.tree.structure(host) != want:
                got = jax.tree.structure(host)
                raise ValueError(f"params do not match the DalleBart config's parameter tree: {got} vs {want}")
            self.params = jax.device_put(host, self._progs.shardings.params)  # the rules, in the kernels' layout
            self._data_size = shd.data_parallel_size(mesh)

    @property
    def native_attention(self) -> bool:
        """Whether the decode attention runs through the native kernels (``self.attention.name == "native"``)."""
        return self.attention.name == "native"

    def padded_rows(self, n: int) -> int:
        """Rows a batch of ``n`` candidates runs as: its bucket, rounded up to a multiple of the data-axis size."""
        bucket = bucket_for(n, self.buckets)
        return -(-bucket // self._data_size) * self._data_size

    def _put(self, name: str, value: np.ndarray) -> jax.Array:
        """Host array -> device: as today without a mesh; else a global array in the programs' sharding."""
        if self.mesh is None:
            return jnp.asarray(value)
        s = self._progs.shardings
        return jax.device_put(value, s.rows[name] if name in s.rows else s.replicated)

    # -------------------------------------------------------------------------------- host side

    def _pad_rows(self, **arrays: Any) -> tuple[int, int, dict[str, np.ndarray]]:
        n = int(np.shape(arrays["enc_ids"])[0])
        bucket = self.padded_rows(n)
        out = {}
        for name, value in arrays.items():
            a = np.asarray(value)
            if a.shape[0] != n:
                raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
            pad = np.repeat(a[:1], bucket - n, axis=0)
            out[name] = np.concatenate([a, pad], axis=0)
        return n, bucket, out

    def _rows(
        self, enc_ids, enc_mask, uncond_ids, uncond_mask, seeds, indices, scale, top_k, top_p, temperature
    ) -> tuple[int, dict[str, jax.Array]]:
        enc_ids = np.asarray(enc_ids, np.int32)
        if enc_ids.ndim != 2:
            raise ValueError(f"enc_ids must be (B, T), got shape {enc_ids.shape}")
        b, t = enc_ids.shape
        if t > self.config.max_text_length:
            raise ValueError(f"text length {t} exceeds max_text_length {self.config.max_text_length}")
        for name, arr in (("enc_mask", enc_mask), ("uncond_ids", uncond_ids), ("uncond_mask", uncond_mask)):
            if np.shape(arr) != (b, t):
                raise ValueError(f"{name} must have shape {(b, t)}, got {np.shape(arr)}")
        temperature = np.broadcast_to(np.asarray(temperature, np.float32), (b,))
        if np.any(temperature <= 0):
            raise ValueError("temperature must be > 0")
        top_p = np.broadcast_to(np.asarray(top_p, np.float32), (b,))
        if np.any((top_p <= 0) | (top_p > 1)):
            raise ValueError("top_p must be in (0, 1]")
        top_k = np.broadcast_to(np.asarray(top_k, np.int64), (b,))
        if np.any(top_k < 0):
            raise ValueError("top_k must be >= 0")
        hi, lo = split_seeds(np.broadcast_to(np.asarray(seeds, dtype=object), (b,)))
        n, bucket, padded = self._pad_rows(
            enc_ids=enc_ids,
            enc_mask=np.asarray(enc_mask, np.int32),
            uncond_ids=np.asarray(uncond_ids, np.int32),
            uncond_mask=np.asarray(uncond_mask, np.int32),
            seed_hi=hi,
            seed_lo=lo,
            indices=np.broadcast_to(np.asarray(indices, np.int64), (b,)).astype(np.uint32),
            scale=np.broadcast_to(np.asarray(scale, np.float32), (b,)),
            top_k=np.minimum(top_k, self.config.num_image_codes).astype(np.int32),
            top_p=top_p,
            temperature=temperature,
        )
        texts = [padded.pop(k) for k in ("enc_ids", "enc_mask", "uncond_ids", "uncond_mask")]
        text_ids, text_mask, text_row = distinct_texts(*texts, max_size=2 * bucket)
        rows = {k: self._put(k, v) for k, v in dataclasses.asdict(_RowParams(text_row=text_row, **padded)).items()}
        return n, dict(rows, text_ids=self._put("text_ids", text_ids), text_mask=self._put("text_mask", text_mask))

    def _row_args(self, rows: dict[str, jax.Array]) -> tuple[Any, ...]:
        return rows["text_row"], rows["seed_hi"], rows["seed_lo"], rows["indices"]

    def _compile_text_programs(self, rows: dict[str, Any]) -> Any:
        """Compile the encoder for every number of distinct texts a pass of this many rows can hold
        (:func:`text_sizes`; one program per count, shared by all buckets) and the per-bucket state programs, the
        first time a pass of this size is seen, so that no later pass of that size compiles. Returns the shape of
        the decode state (the same for every text count)."""
        key = (rows["text_row"].shape[0], rows["text_ids"].shape[1])
        if key not in self._state_shapes:
            b, t = key
            for size in text_sizes(b):
                texts = jax.ShapeDtypeStruct((size, t), jnp.int32)
                self._progs.executable("encode", self.params, texts, texts)
                text_kv = jax.eval_shape(self._progs.encode_jit, self.params, texts, texts)
                args = (text_kv, texts, *self._row_args(rows))
                self._progs.executable("prepare", *args)
            self._state_shapes[key] = jax.eval_shape(self._progs.prepare_jit, *args)
        return self._state_shapes[key]

    def _prepare(self, rows: dict[str, jax.Array]) -> Any:
        """Encode the pass's distinct texts, then the decode state of its rows."""
        if self.eager_text_programs:
            self._compile_text_programs(rows)
        text_kv = self._progs.call("encode", self.params, rows["text_ids"], rows["text_mask"])
        return self._progs.call("prepare", text_kv, rows["text_mask"], *self._row_args(rows))

    def warmup(self, buckets: Sequence[int] | None = None, *, chunked: bool = False) -> int:
        """Compile (without running) the programs for ``buckets`` (default: all) at text length ``max_text_length``:
        the text encoder for every number of distinct texts a pass of that size can hold (:func:`text_sizes`),
        and the decoder loop.

        ``chunked=True`` compiles the progress-hook path's chunk programs instead of the single whole loop.
        Returns how many programs this sampler's config/dtype now has compiled.
        """
        t, length = self.config.max_text_length, self.config.image_length
        for bucket in buckets or self.buckets:
            ids = np.ones((bucket, t), np.int32)
            _, rows = self._rows(ids, ids, ids, ids, [0] * bucket, [0] * bucket, 10.0, 50, 1.0, 1.0)
            state = self._compile_text_programs(rows)
            chunk = self.chunk_size if chunked else length
            for pieces in sorted({self._progs.pieces(d, min(chunk, length - d)) for d in range(0, length, chunk)}):
                self._progs.executable(
                    "chunk", self.params, state, self._put("start", np.int32(0)), rows["scale"], rows["top_k"],
                    rows["top_p"], rows["temperature"], pieces=pieces, collect=False,
                )
        return self._progs.num_compiled

    def sample(
        self,
        enc_ids: Any,
        enc_mask: Any,
        uncond_ids: Any,
        uncond_mask: Any,
        seeds: Any,
        indices: Any,
        scale: Any = 10.0,
        top_k: Any = 50,
        top_p: Any = 1.0,
        temperature: Any = 1.0,
        on_chunk: ChunkHook | None = None,
    ) -> np.ndarray:
        """Sample ``image_length`` codes per row.

        enc_ids, enc_mask, uncond_ids, uncond_mask: (B,T) int; seeds (B,) ints in [0, 2**64); indices (B,)
        candidate indices; scale, top_p, temperature (B,) float and top_k (B,) int (scalars broadcast).
        ``on_chunk(steps_done, tokens_so_far (B, steps_done) int32)`` is called after every ``chunk_size`` steps
        (raise from it to abort; the next chunk is already running when it is called). Returns tokens
        (B, image_length) int32, each < ``config.num_image_codes``.
        """
        tokens, _ = self._sample(
            enc_ids, enc_mask, uncond_ids, uncond_mask, seeds, indices, scale, top_k, top_p, temperature,
            on_chunk=on_chunk, collect=False,
        )
        return tokens

    def sample_with_logits(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`sample` but also returns each step's raw decoder logits (B, 2, image_length, V+1) float32.

        ``[:, 0]`` is the conditional branch and ``[:, 1]`` the unconditional one; for tests and debugging.
        """
        tokens, logits = self._sample(*args, collect=True, **kwargs)
        n = tokens.shape[0]
        return tokens, logits.reshape(n, 2, *logits.shape[1:])

    def _sample(
        self, enc_ids, enc_mask, uncond_ids, uncond_mask, seeds, indices, scale=10.0, top_k=50, top_p=1.0,
        temperature=1.0, on_chunk: ChunkHook | None = None, collect: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n, rows = self._rows(enc_ids, enc_mask, uncond_ids, uncond_mask, seeds, indices, scale, top_k, top_p,
                             temperature)
        state = self._prepare(rows)
        # without a hook the whole loop is one chunk. With one, one chunk of look-ahead: chunk k+1 is dispatched
        # (asynchronously) before the hook sees chunk k, so the device never idles while the hook runs; a hook that
        # raises stops after at most one extra chunk
        done, token_parts, logit_parts, pending = 0, [], [], None
        length = self.config.image_length
        chunk = length if on_chunk is None else self.chunk_size
        while done < length or pending is not None:
            launched = None
            if done < length:
                steps = min(chunk, length - done)
                state, tokens, logits = self._progs.call(
                    "chunk",
                    self.params, state, self._put("start", np.int32(done)), rows["scale"], rows["top_k"],
                    rows["top_p"], rows["temperature"], pieces=self._progs.pieces(done, steps), collect=collect,
                )
                done += steps
                launched = (done, tokens, logits)
            if pending is not None:
                upto, tokens_k, logits_k = pending
                token_parts.append(np.asarray(tokens_k)[:n])
                if collect:
                    logit_parts.append(np.asarray(logits_k)[: 2 * n])
                if on_chunk is not None:
                    on_chunk(upto, np.concatenate(token_parts, axis=1))
            pending = launched
        logits_np = np.concatenate(logit_parts, axis=1) if collect else None
        return np.concatenate(token_parts, axis=1), logits_np
