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

- :mod:`engine.sampling.logits`: guidance, temperature, top-k/top-p and the draw; the per-candidate keys;
- :mod:`engine.sampling.programs`: the jitted encode / prepare / decode-loop programs, shared by samplers of one
  config, dtype, mesh, cache layout and attention backend, and where their inputs and state live on a mesh;
- :mod:`engine.sampling.sampler`: :class:`Sampler`, the host side (padding to a bucket, distinct texts, chunks
  and the progress hook).
"""

from engine.api import DEFAULT_BUCKETS, bucket_for
from engine.sampling.logits import (
    FAST_TOP_K,
    RANK_WIDTHS,
    candidate_keys,
    process_logits,
    sample_tokens,
    split_seeds,
)
from engine.sampling.programs import default_transposed_kernels, device_platform, distinct_texts, text_sizes
from engine.sampling.sampler import ChunkHook, Sampler

__all__ = [
    "DEFAULT_BUCKETS",
    "FAST_TOP_K",
    "RANK_WIDTHS",
    "ChunkHook",
    "Sampler",
    "bucket_for",
    "candidate_keys",
    "default_transposed_kernels",
    "device_platform",
    "distinct_texts",
    "process_logits",
    "sample_tokens",
    "split_seeds",
    "text_sizes",
]
