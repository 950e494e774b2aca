"""Prompts → candidates → VQGAN decode → CLIP rank → safety: the engine's model side in one object.

A checkpoint is a directory with one sub-directory per model, each in its published layout, so the
published DALL·E mini / Mega, VQGAN and CLIP files drop in unchanged (README: "Using the published weights")::

    CHECKPOINT/
      dallebart/   config.json, flax_model.msgpack (or *.safetensors), tokenizer.json or vocab.json+merges.txt
      vqgan/       config.json, flax_model.msgpack
      clip/        config.json, flax_model.msgpack / model.safetensors / pytorch_model.bin, tokenizer files
      safety.json  optional: CLIP safety concepts (engine.safety)
      checkpoint.json  optional: {"id": "...", "sampling": {"condition_scale": 3, "top_k": 8, ...}} (engine.checkpoint)
                       (default id: the directory name; "sampling": the checkpoint's recommended sampling
                       params, used for every field a request leaves unset — engine.api.SamplingParams)

:class:`ModelPipeline` implements :class:`engine.api.Pipeline`: one :meth:`generate` call samples every
candidate of several requests in ONE sampling pass (the batcher merges users' requests), then decodes,
scores and ranks them per request. Candidate ``i`` of a request uses the random stream ``(seed, i)``, so
results do not depend on what else was in the batch.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from engine import weights
from engine.api import GeneratedImage, GenerationRequest, GenerationResult, SamplingParams, check_image_prefix
from engine.checkpoint import DEFAULT_CHECKPOINT, check_directory, checkpoint_id_of, sampling_defaults_of
from engine.config import CLIPConfig, DalleBartConfig, VQGANConfig
from engine.models import clip as clip_model
from engine.models import vqgan as vqgan_model
from engine.models.layout import load_dallebart_params
from engine.safety import SafetyChecker
from engine.sampling import DEFAULT_BUCKETS, Sampler, bucket_for, device_platform
from engine.text import CLIPTokenizer, DalleBartTokenizer

log = logging.getLogger(__name__)

class _Abort(Exception):
    """Raised from the sampler's chunk hook when every request of the pass was cancelled."""


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _usable_cores() -> int:
    """CPU cores this process may run on (a container's share, where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] → uint8 (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PipelineOptions:
    dtype: str = "float32"  # DalleBart weights and activations; logits and guidance are always float32
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    chunk_size: int = 32  # tokens per jitted chunk when progress is reported
    vqgan_dtype: str = "float32"
    use_clip: bool = True
    # None: DalleBart on one device (the default, fastest on CPU); k: a ("data", "model") mesh over every device
    # (all hosts after engine.sharding.initialize_distributed), k devices per model replica (engine.sharding)
    model_parallel: int | None = None
    # the first pass of a batch size compiles the text encoder for every number of distinct texts it can hold (a
    # server under load never stalls on one later); False: only the count each pass needs, when it first comes
    # (one request at a time: the terminal front end, `engine generate`, ENGINE_WARMUP=false)
    eager_text_programs: bool = True
    # threads that PNG-encode a pass's images (zlib releases the GIL, so they run in parallel); None: one per CPU
    # core, at most 8. Nine 256x256 images take about 0.1 s on one core: on a GPU host that is ~10% of a Mega grid
    png_threads: int | None = None
    # the decode attention backend (engine.attention.select_backend): None, our C++ kernels wherever they apply
    # (float32 on CPU devices; built with the system compiler on first use), else XLA's attention; False: XLA's
    # attention; True: the kernels or an error. Their logits differ from XLA's attention in the last bits, so a
    # seed's tokens can differ between the two in rare steps; every result names the backend that made it
    native_attention: bool | None = None


def half_precision_on_cpu(dtype: Any, platform: str) -> str | None:
    """The warning for a 16-bit DalleBart on a CPU, else None.

    XLA:CPU has few 16-bit kernels. Measured on a 2-core AMD EPYC (bench/RESULTS.md, "Other dtypes and batch
    sizes"), mini at batch 8 took 154 ms a step in bfloat16 against 64 ms in float32, and the demo model at 16 took
    9.3 against 5.9 ms.
    Half precision is for fitting Mega on an accelerator, so a CPU user should hear that float32 is faster here.
    """
    name = jnp.dtype(dtype).name
    if platform != "cpu" or name == "float32":
        return None
    return (f"DalleBart runs in {name} on a CPU, where XLA has few 16-bit kernels: it samples about 1.5-2.5x "
            "slower than in float32 (bench/RESULTS.md). float32 is the faster choice on a CPU.")


class ModelPipeline:
    """The real :class:`engine.api.Pipeline` over DalleBart + VQGAN (+ CLIP ranking and safety)."""

    def __init__(
        self,
        *,
        dallebart_config: DalleBartConfig,
        dallebart_params: Any,
        tokenizer: DalleBartTokenizer,
        vqgan_config: VQGANConfig,
        vqgan_params: Any,
        clip_config: CLIPConfig | None = None,
        clip_params: Any = None,
        clip_tokenizer: CLIPTokenizer | None = None,
        safety: SafetyChecker | None = None,
        checkpoint_id: str = "checkpoint",
        options: PipelineOptions = PipelineOptions(),
        mesh: Any = None,
        sampling_defaults: SamplingParams | None = None,
        transposed_kernels: bool | None = None,  # the sampler's kernel layout (None: its per-platform default)
    ) -> None:
        self.config = dallebart_config
        # what a request's unset sampling fields become (fully resolved: never None)
        self.sampling_defaults = (sampling_defaults or SamplingParams()).resolve()
        self.options = options
        # the options asked for, which load_pipeline may have narrowed for this checkpoint (no clip/ part: use_clip
        # False); another checkpoint is loaded with these (with_checkpoint)
        self.load_options = options
        self.checkpoint_id = checkpoint_id
        self.batch_buckets = tuple(sorted(options.buckets))
        self.tokenizer = tokenizer
        if mesh is None and options.model_parallel is not None:
            from engine.sharding import make_mesh

            mesh = make_mesh(options.model_parallel)
        self.mesh = mesh
        self.sampler = Sampler(
            None,
            dallebart_params,
            dallebart_config,
            dtype=weights.as_dtype(options.dtype),
            buckets=self.batch_buckets,
            chunk_size=options.chunk_size,
            eager_text_programs=options.eager_text_programs,
            mesh=mesh,
            transposed_kernels=transposed_kernels,
            native_attention=options.native_attention,
        )
        slow = half_precision_on_cpu(self.sampler.dtype, device_platform(mesh))
        if slow:
            log.warning(slow)
        if vqgan_config.grid_size**2 != dallebart_config.image_length:
            raise ValueError(
                f"VQGAN grid {vqgan_config.grid_size}x{vqgan_config.grid_size} does not match DalleBart "
                f"image_length {dallebart_config.image_length}"
            )
        if dallebart_config.num_image_codes > vqgan_config.n_embed:
            raise ValueError("DalleBart emits more image codes than the VQGAN codebook has")
        self.vqgan_config = vqgan_config
        vq = vqgan_model.VQModel(
            vqgan_config, norm_groups=vqgan_config.norm_groups, dtype=weights.as_dtype(options.vqgan_dtype)
        )
        self._vq_params = vqgan_params
        self._decode = jax.jit(lambda p, t: vq.apply({"params": p}, t, clip=True, method=vq.decode_code))

        self.clip_config = clip_config if options.use_clip else None
        self.clip_tokenizer = clip_tokenizer
        self._clip_params = clip_params
        if self.clip_config is not None:
            if clip_params is None or clip_tokenizer is None:
                raise ValueError("CLIP ranking needs CLIP params and a CLIP tokenizer")
            cm = clip_model.CLIPModel(self.clip_config)
            size = self.clip_config.vision_config.image_size
            self._image_features = jax.jit(
                lambda p, x: cm.apply({"params": p}, clip_model.preprocess(x, size), method=cm.get_image_features)
            )
            self._text_features = jax.jit(
                lambda p, ids, m: cm.apply({"params": p}, ids, m, method=cm.get_text_features)
            )
        self.safety = safety or SafetyChecker.disabled()
        threads = options.png_threads if options.png_threads is not None else min(8, _usable_cores())
        if threads < 1:
            raise ValueError(f"png_threads must be >= 1, got {threads}")
        self._png_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png")

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def image_length(self) -> int:
        return self.config.image_length

    def check_request(self, request: GenerationRequest) -> None:
        """Raise ``BadRequest`` if the request's image prefix does not fit this model (length, codebook): called
        when a request is queued, so a bad one is refused alone instead of failing the pass it would join."""
        check_image_prefix(request.image_prefix, self.config.image_length, self.config.num_image_codes)

    @property
    def attention(self) -> str:
        """The decode attention backend's name ("xla" or "native"), recorded in every result."""
        return self.sampler.attention.name

    def with_checkpoint(self, directory: str | Path) -> ModelPipeline:
        """The checkpoint at ``directory`` loaded with this pipeline's options and mesh (what a reload swaps in)."""
        return load_pipeline(directory, mesh=self.mesh, **dataclasses.asdict(self.load_options))

    def close(self) -> None:
        """Stop the PNG threads (the pipeline is done with; its arrays go with the last reference to it)."""
        self._png_pool.shutdown(wait=False)

    def _bucket(self, n: int) -> int:
        """Rows to pad ``n`` to so jitted VQGAN/CLIP calls reuse one compile per bucket (``n`` itself above them)."""
        return bucket_for(n, self.batch_buckets) if n <= max(self.batch_buckets) else n

    def decode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(B, image_length) codes → (B, H, W, 3) float32 in [0, 1]; padded to a bucket to reuse compiles."""
        tokens = np.asarray(tokens, np.int32)
        n = tokens.shape[0]
        bucket = self._bucket(n)
        padded = np.concatenate([tokens, np.repeat(tokens[:1], bucket - n, axis=0)]) if bucket > n else tokens
        return np.asarray(self._decode(self._vq_params, jnp.asarray(padded)))[:n]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """CLIP text embeddings (N, projection_dim), L2-normalised."""
        n = len(texts)
        bucket = self._bucket(n)
        enc = self.clip_tokenizer(list(texts) + [texts[0]] * (bucket - n))  # padded: one compile per bucket
        feats = np.asarray(self._text_features(self._clip_params, enc["input_ids"], enc["attention_mask"]))[:n]
        return feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """CLIP image embeddings (N, projection_dim) of [0, 1] images, L2-normalised."""
        n = images.shape[0]
        bucket = self._bucket(n)
        padded = np.concatenate([images, np.repeat(images[:1], bucket - n, axis=0)]) if bucket > n else images
        feats = np.asarray(self._image_features(self._clip_params, jnp.asarray(padded)))[:n]
        return feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)

    def _preview(self, tokens_so_far: np.ndarray, row: int) -> bytes:
        """A progress preview: decode one candidate with the not-yet-sampled positions set to code 0."""
        full = np.zeros((1, self.image_length), np.int32)
        full[0, : tokens_so_far.shape[1]] = tokens_so_far[row]
        return png_bytes(to_uint8(self.decode_tokens(full)[0]))

    # ------------------------------------------------------------------------------------------ Pipeline

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: Callable[[str, int, int, bytes | None], None] | None = None,
        should_cancel: Callable[[str], bool] | None = None,
    ) -> list[GenerationResult]:
        """Sample every candidate of ``requests`` in one pass; results in request order (cancelled ones dropped)."""
        if not requests:
            return []
        t_start = time.perf_counter()
        owners: list[int] = []  # row → request position
        indices: list[int] = []
        for pos, req in enumerate(requests):
            req.validate()
            self.check_request(req)
            first = int(getattr(req, "first_index", 0))
            owners.extend([pos] * req.n)
            indices.extend(range(first, first + req.n))
        rows = len(owners)
        if rows > max(self.batch_buckets):
            raise ValueError(f"{rows} candidates exceed the largest batch bucket {max(self.batch_buckets)}")
        owner = np.asarray(owners)
        text = self.tokenizer([r.prompt for r in requests])
        uncond = self.tokenizer.unconditional(rows)
        p = [r.params.resolve(self.sampling_defaults) for r in requests]
        seeds = np.array([requests[o].seed for o in owners], dtype=object)

        first_row = {pos: owners.index(pos) for pos in range(len(requests))}
        next_preview = {pos: r.preview_every for pos, r in enumerate(requests) if r.preview_every > 0}
        total = self.image_length

        def on_chunk(done: int, tokens_so_far: np.ndarray) -> None:
            if should_cancel is not None and all(should_cancel(r.request_id) for r in requests):
                raise _Abort
            if on_progress is None:
                return
            for pos, req in enumerate(requests):
                preview = None
                if pos in next_preview and (done >= next_preview[pos] or done == total):
                    preview = self._preview(tokens_so_far, first_row[pos])
                    while next_preview[pos] <= done:
                        next_preview[pos] += req.preview_every
                on_progress(req.request_id, done, total, preview)

        t0 = time.perf_counter()
        try:
            tokens = self.sampler.sample(
                text["input_ids"][owner],
                text["attention_mask"][owner],
                uncond["input_ids"],
                uncond["attention_mask"],
                seeds,
                np.asarray(indices),
                scale=np.array([p[o].condition_scale for o in owners], np.float32),
                top_k=np.array([p[o].top_k for o in owners], np.int32),
                top_p=np.array([p[o].top_p for o in owners], np.float32),
                temperature=np.array([p[o].temperature for o in owners], np.float32),
                on_chunk=on_chunk if (on_progress is not None or should_cancel is not None) else None,
                prefix=[requests[o].image_prefix for o in owners],
            )
        except _Abort:  # every request of the pass was cancelled: stop sampling, nothing to return
            return []
        t_sample = time.perf_counter() - t0

        t0 = time.perf_counter()
        images = self.decode_tokens(tokens)
        t_decode = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.clip_config is not None:
            img_emb = self.embed_images(images)
            txt_emb = self.embed_texts([r.prompt for r in requests])
            scale = float(np.exp(np.asarray(self._clip_params["logit_scale"])))
            clip_scores = scale * np.einsum("nd,nd->n", img_emb, txt_emb[owner])
            verdicts = self.safety.check(img_emb)
        else:
            clip_scores = np.zeros(rows, np.float32)
            verdicts = SafetyChecker.disabled().check(np.zeros((rows, 1), np.float32))
        t_rank = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows_of = {pos: np.flatnonzero(owner == pos) for pos, req in enumerate(requests)
                   if should_cancel is None or not should_cancel(req.request_id)}  # the requests still wanted
        kept_rows = [int(r) for mine in rows_of.values() for r in mine]
        pixels = to_uint8(images[kept_rows])
        pngs = dict(zip(kept_rows, self._png_pool.map(png_bytes, pixels), strict=True))
        t_encode = time.perf_counter() - t0

        results = []
        for pos, mine in rows_of.items():
            req = requests[pos]
            order = sorted(mine, key=lambda r: (-float(clip_scores[r]), indices[r]))
            imgs = [
                GeneratedImage(
                    index=indices[r],
                    rank=rank,
                    png=pngs[int(r)],
                    tokens=tokens[r].astype(np.int16),
                    clip_score=float(clip_scores[r]),
                    safety=dict(verdicts[r].scores),
                    flagged=verdicts[r].flagged,
                    critical=verdicts[r].critical,
                )
                for rank, r in enumerate(order)
            ]
            results.append(
                GenerationResult(
                    request_id=req.request_id,
                    prompt=req.prompt,
                    seed=req.seed,
                    images=imgs,
                    checkpoint_id=self.checkpoint_id,
                    attention=self.attention,
                    timings={
                        "sample_s": t_sample,
                        "decode_s": t_decode,
                        "rank_s": t_rank,
                        "encode_s": t_encode,
                        "total_s": time.perf_counter() - t_start,
                        "batch_candidates": float(rows),
                    },
                )
            )
        return results


# ---------------------------------------------------------------------------------------------- loading


def load_pipeline(checkpoint_dir: str | Path | None = None, *, mesh: Any = None, **opts: Any) -> ModelPipeline:
    """Load a checkpoint directory (see the module docstring) into a ready :class:`ModelPipeline`.

    ``opts`` are :class:`PipelineOptions` fields (``dtype``, ``buckets``, ``chunk_size``, ``use_clip``,
    ``model_parallel``...). ``mesh``: an explicit ``jax.sharding.Mesh`` for DalleBart (overrides ``model_parallel``).
    Raises :class:`engine.checkpoint.CheckpointMissing` for a missing directory or part,
    ``engine.config.ConfigError`` or ``engine.weights.CheckpointError`` for a malformed one, each with a message
    naming the file.
    """
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else DEFAULT_CHECKPOINT
    unknown = set(opts) - {f.name for f in dataclasses.fields(PipelineOptions)}
    if unknown:
        raise TypeError(f"unknown pipeline option(s): {', '.join(sorted(unknown))}")
    if "buckets" in opts:
        opts["buckets"] = tuple(int(b) for b in opts["buckets"])
    options = requested = PipelineOptions(**opts)
    check_directory(directory)

    db_dir = directory / "dallebart"
    db_config = DalleBartConfig.from_json(db_dir)
    # the sampler decodes with per-layer params: load straight into that layout (no re-stacking); the sampler then
    # makes its decode copy (cast; kernels transposed on CPU) and these are dropped when this function returns
    db_params = load_dallebart_params(db_dir, dataclasses.replace(db_config, use_scan=False))
    tokenizer = DalleBartTokenizer.from_dir(db_dir, max_length=db_config.max_text_length,
                                            normalize=db_config.normalize_text)

    vq_dir = directory / "vqgan"
    vq_config = VQGANConfig.from_json(vq_dir)
    vq = vqgan_model.VQModel(vq_config, norm_groups=vq_config.norm_groups)
    grid = vq_config.grid_size
    vq_shapes = jax.eval_shape(
        lambda r: vq.init(r, jnp.zeros((1, grid * grid), jnp.int32), method=vq.decode_code)["params"],
        jax.random.PRNGKey(0),
    )
    vq_params = weights.load_params(vq_dir, vq_shapes, dtype=options.vqgan_dtype, drop_unexpected=True)

    clip_cfg = clip_params = clip_tok = None
    clip_dir = directory / "clip"
    if options.use_clip and (clip_dir / "config.json").is_file():
        clip_cfg = CLIPConfig.from_json(clip_dir)
        cm = clip_model.CLIPModel(clip_cfg)
        clip_shapes = jax.eval_shape(
            lambda r: cm.init(r, *clip_model.dummy_inputs(clip_cfg))["params"], jax.random.PRNGKey(0)
        )
        clip_params = weights.load_params(clip_dir, clip_shapes, dtype="float32")
        clip_tok = CLIPTokenizer.from_dir(clip_dir, max_length=clip_cfg.text_config.max_position_embeddings)
    elif options.use_clip:
        log.warning("%s has no clip/ part: images are not ranked or safety-checked", directory)
        options = dataclasses.replace(options, use_clip=False)

    pipeline = ModelPipeline(
        dallebart_config=db_config,
        dallebart_params=db_params,
        tokenizer=tokenizer,
        vqgan_config=vq_config,
        vqgan_params=vq_params,
        clip_config=clip_cfg,
        clip_params=clip_params,
        clip_tokenizer=clip_tok,
        checkpoint_id=checkpoint_id_of(directory),
        options=options,
        mesh=mesh,
        sampling_defaults=sampling_defaults_of(directory),
    )
    pipeline.load_options = requested
    safety_file = directory / "safety.json"
    if safety_file.is_file() and clip_cfg is not None:
        pipeline.safety = SafetyChecker.from_file(safety_file, pipeline.embed_texts)
    return pipeline
