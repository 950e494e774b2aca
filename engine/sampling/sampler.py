"""The sampler's host side: inputs padded to a batch bucket, distinct texts, chunks and the progress hook."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from engine import sharding as shd
from engine.api import DEFAULT_BUCKETS, bucket_for
from engine.attention import select_backend
from engine.config import DalleBartConfig
from engine.models.dallebart import DalleBart
from engine.models.layout import normalize_layout, to_decode_layout
from engine.sampling.logits import split_seeds
from engine.sampling.programs import (
    RowParams,
    default_transposed_kernels,
    device_platform,
    distinct_texts,
    programs_for,
    text_sizes,
)

ChunkHook = Callable[[int, np.ndarray], Any]


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
        self._progs = programs_for(self._decode_config, self.dtype.name, mesh, self.cache_blocks, self.attention)
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
        self, enc_ids, enc_mask, uncond_ids, uncond_mask, seeds, indices, scale, top_k, top_p, temperature,
        prefix=None,
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
        prefix_buf, prefix_len = self._prefixes(prefix, b)
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
            prefix=prefix_buf,
            prefix_len=prefix_len,
        )
        texts = [padded.pop(k) for k in ("enc_ids", "enc_mask", "uncond_ids", "uncond_mask")]
        text_ids, text_mask, text_row = distinct_texts(*texts, max_size=2 * bucket)
        rows = {k: self._put(k, v) for k, v in dataclasses.asdict(RowParams(text_row=text_row, **padded)).items()}
        return n, dict(rows, text_ids=self._put("text_ids", text_ids), text_mask=self._put("text_mask", text_mask))

    def _prefixes(self, prefix: Any, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-row forced prefixes (a sequence of B token sequences, or None) as a (B, image_length) buffer and
        (B,) lengths."""
        length, codes = self.config.image_length, self.config.num_image_codes
        buf = np.zeros((b, length), np.int32)
        lens = np.zeros((b,), np.int32)
        if prefix is None:
            return buf, lens
        if len(prefix) != b:
            raise ValueError(f"prefix must give one token sequence per row ({b}), got {len(prefix)}")
        for row, seq in enumerate(prefix):
            seq = np.asarray(seq if seq is not None else (), np.int64).reshape(-1)
            if seq.size > length:
                raise ValueError(f"prefix of row {row} has {seq.size} tokens; the image has {length}")
            if seq.size and (seq.min() < 0 or seq.max() >= codes):
                raise ValueError(f"prefix of row {row} holds token ids outside the codebook [0, {codes})")
            buf[row, : seq.size] = seq
            lens[row] = seq.size
        return buf, lens

    def _row_args(self, rows: dict[str, jax.Array]) -> tuple[Any, ...]:
        return (rows["text_row"], rows["seed_hi"], rows["seed_lo"], rows["indices"], rows["prefix"],
                rows["prefix_len"])

    def _compile_textprograms_for(self, rows: dict[str, Any]) -> Any:
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
            self._compile_textprograms_for(rows)
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
            state = self._compile_textprograms_for(rows)
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
        prefix: Sequence[Any] | None = None,
    ) -> np.ndarray:
        """Sample ``image_length`` codes per row.

        enc_ids, enc_mask, uncond_ids, uncond_mask: (B,T) int; seeds (B,) ints in [0, 2**64); indices (B,)
        candidate indices; scale, top_p, temperature (B,) float and top_k (B,) int (scalars broadcast).
        ``prefix``: per row, the tokens its first positions take instead of sampled ones (an empty sequence: none),
        so a row can keep the top of another image; the other rows of the pass are not affected.
        ``on_chunk(steps_done, tokens_so_far (B, steps_done) int32)`` is called after every ``chunk_size`` steps
        (raise from it to abort; the next chunk is already running when it is called). Returns tokens
        (B, image_length) int32, each < ``config.num_image_codes``.
        """
        tokens, _ = self._sample(
            enc_ids, enc_mask, uncond_ids, uncond_mask, seeds, indices, scale, top_k, top_p, temperature,
            on_chunk=on_chunk, collect=False, prefix=prefix,
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
        temperature=1.0, on_chunk: ChunkHook | None = None, collect: bool = False, prefix=None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n, rows = self._rows(enc_ids, enc_mask, uncond_ids, uncond_mask, seeds, indices, scale, top_k, top_p,
                             temperature, prefix)
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
