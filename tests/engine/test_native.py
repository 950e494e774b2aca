"""Our C++ decode attention (engine/attention/native): built on first use, the same tokens as XLA's attention, and a
clear fallback where it cannot be built."""

import logging
import os

import numpy as np
import pytest

from engine.attention.native import kernels as native
from engine.config import DalleBartConfig
from engine.pipeline import load_pipeline
from engine.sampling import Sampler
from training.fixtures import random_checkpoint

CFG = DalleBartConfig(
    d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=96, decoder_ffn_dim=96, encoder_vocab_size=100, image_vocab_size=64, max_text_length=8,
    image_length=16, decoder_start_token_id=64, bos_token_id=65, eos_token_id=65, pad_token_id=65,
)

if native.compiler() is None and os.environ.get("DALLE_REQUIRE_COMPILER") == "1":
    raise RuntimeError("DALLE_REQUIRE_COMPILER=1 but no C++ compiler is on PATH: the native kernel cannot be tested")
# without a compiler the kernel cannot exist; the fallback test below still runs (CI sets DALLE_REQUIRE_COMPILER)
needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module")
def params():
    from bench.sampler import random_params

    return random_params(CFG, seed=3)


def _texts():
    ids = np.array([[0, 5, 6, 2, 1, 1, 1, 1], [0, 7, 2, 1, 1, 1, 1, 1], [0, 9, 9, 9, 2, 1, 1, 1]], np.int32)
    un = np.tile(np.array([0, 2, 1, 1, 1, 1, 1, 1], np.int32), (3, 1))
    return ids, (ids != 1).astype(np.int32), un, (un != 1).astype(np.int32)


@needs_compiler
@pytest.mark.parametrize("blocks", [1, 4])
def test_native_attention_samples_the_same_tokens_as_xla(params, blocks):
    """Whole loop and progress chunks that straddle cache blocks: the kernel writes each step's key/value and
    attends to the written slots only; the step logits agree with XLA's attention to float rounding."""
    xla = Sampler(None, params, CFG, buckets=(4,), cache_blocks=blocks, chunk_size=6, native_attention=False)
    own = Sampler(None, params, CFG, buckets=(4,), cache_blocks=blocks, chunk_size=6, native_attention=True)
    assert own.native_attention and not xla.native_attention
    kw = dict(scale=[10.0, 3.0, 1.0], top_k=[50, 5, 0], temperature=[1.0, 0.7, 1.5])
    tokens, logits = xla.sample_with_logits(*_texts(), [1, 2, 3], [0, 1, 2], **kw)
    tokens_n, logits_n = own.sample_with_logits(*_texts(), [1, 2, 3], [0, 1, 2], **kw)
    np.testing.assert_array_equal(tokens_n, tokens)
    np.testing.assert_allclose(logits_n, logits, atol=1e-5, rtol=1e-5)
    seen = []
    hooked = own.sample(*_texts(), [1, 2, 3], [0, 1, 2], on_chunk=lambda d, t: seen.append(d), **kw)
    np.testing.assert_array_equal(hooked, tokens)
    assert seen == [6, 12, 16]


def _softmax_attend(q, k, v, bias):
    """numpy reference: q (B,H,Dh) over k, v (B,H,S,Dh) with bias (B,S) -> (B,H,Dh)."""
    scores = np.einsum("bhd,bhsd->bhs", q, k) + bias[:, None, :]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhs,bhsd->bhd", p / p.sum(-1, keepdims=True), v)


@needs_compiler
@pytest.mark.parametrize("dh", [16, 20, 3])  # whole SIMD registers, registers and a tail, a tail only
@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_match_a_numpy_reference(dh, threads):
    import jax.numpy as jnp

    assert native.load()
    rng = np.random.default_rng(dh)
    b, h, t, width, blocks, pos = 3, 5, 7, 4, 3, 6
    q = rng.standard_normal((b, 1, h, dh), np.float32)
    k_new, v_new = (rng.standard_normal((b, h, 1, dh), np.float32) for _ in range(2))
    k_blocks = [rng.standard_normal((b, h, width, dh), np.float32) for _ in range(blocks)]
    v_blocks = [rng.standard_normal((b, h, width, dh), np.float32) for _ in range(blocks)]
    out, k_out, v_out = native.decode_attention(jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new), pos,
                                                [jnp.asarray(x) for x in k_blocks], [jnp.asarray(x) for x in v_blocks],
                                                threads=threads)
    k_all, v_all = np.concatenate(k_blocks, 2), np.concatenate(v_blocks, 2)
    k_all[:, :, pos], v_all[:, :, pos] = k_new[:, :, 0], v_new[:, :, 0]
    np.testing.assert_array_equal(np.concatenate([np.asarray(x) for x in k_out], 2), k_all)
    np.testing.assert_array_equal(np.concatenate([np.asarray(x) for x in v_out], 2), v_all)
    want = _softmax_attend(q[:, 0], k_all[:, :, : pos + 1], v_all[:, :, : pos + 1], np.zeros((b, pos + 1), np.float32))
    np.testing.assert_allclose(np.asarray(out)[:, 0], want, rtol=1e-5, atol=1e-5)

    k, v = (rng.standard_normal((b, h, t, dh), np.float32) for _ in range(2))
    mask = np.ones((b, t), bool)
    mask[0, 3:], mask[2, 1:] = False, False  # padded texts; row 2 keeps one key
    bias = np.where(mask, 0.0, -1e9).astype(np.float32)
    got = native.cross_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bias[:, None, None]),
                                 threads=threads)
    np.testing.assert_allclose(np.asarray(got)[:, 0], _softmax_attend(q[:, 0], k, v, bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[2, 0], v[2, :, 0], rtol=1e-5, atol=1e-6)


def test_native_attention_needs_float32(params):
    with pytest.raises(ValueError, match="float32"):
        Sampler(None, params, CFG, dtype="bfloat16", buckets=(1,), native_attention=True)
    assert not Sampler(None, params, CFG, dtype="bfloat16", buckets=(1,)).native_attention  # the default: XLA's


@needs_compiler
def test_native_attention_is_the_default_on_cpu_in_float32(params):
    from engine.sharding import make_mesh

    assert Sampler(None, params, CFG, buckets=(1,)).native_attention
    assert Sampler(None, params, CFG, buckets=(1,), mesh=make_mesh(1)).native_attention
    assert not Sampler(None, params, CFG, buckets=(1,), native_attention=False).native_attention


def test_without_a_compiler_the_sampler_says_why_and_keeps_xla_attention(params, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DALLE_NATIVE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="engine.attention.native.kernels"):
        s = Sampler(None, params, CFG, buckets=(1,), native_attention=True)
    assert not s.native_attention and s.cache_blocks == 1
    assert "no C++ compiler found" in native.unavailable_reason()
    assert any("XLA's attention is used instead" in r.getMessage() for r in caplog.records)
    ids, mask, un, umask = (x[:1] for x in _texts())
    assert s.sample(ids, mask, un, umask, [1], [0]).shape == (1, CFG.image_length)


@needs_compiler
def test_a_compile_error_is_reported_with_the_compilers_words(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setenv("DALLE_NATIVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.build()
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built is left to be loaded later


@needs_compiler
def test_the_pipeline_option_reaches_the_sampler(tmp_path):
    directory = random_checkpoint(tmp_path / "tiny", with_clip=False)
    pipeline = load_pipeline(directory, native_attention=True)
    assert pipeline.sampler.native_attention
    from engine.api import GenerationRequest

    (result,) = pipeline.generate([GenerationRequest("a red circle", n=2, seed=5)])
    assert len(result.images) == 2


@needs_compiler
def test_bench_sampler_times_the_native_kernel_over_the_whole_image(tmp_path):
    import io
    import json
    from contextlib import redirect_stdout

    from bench import sampler as bench_sampler

    out = io.StringIO()
    with redirect_stdout(out):
        # 2 cache blocks: programs of their own, so test_bench_sampler's run still compiles (and times) its own
        rc = bench_sampler.main(["--configs", "tiny", "--batches", "2", "--dtypes", "float32", "--steps", "8",
                                 "--skip-mindalle", "--native-attention", "--cache-blocks", "2",
                                 "--json", str(tmp_path / "s.json")])
    assert rc == 0
    (row,) = [r for r in json.loads((tmp_path / "s.json").read_text())["rows"] if r["sampler"] != "roofline"]
    assert row["sampler"] == "ours" and row["attention"] == "native" and row["step_s"] > 0
    assert "| tiny | float32 | 2 | ours | native |" in out.getvalue()


@needs_compiler
def test_engine_generate_and_serve_take_native_attention(tmp_path, monkeypatch):
    """`engine generate --native-attention` samples with a pipeline whose sampler uses the kernel, and
    `--no-native-attention` with one that does not; `engine serve` passes either on, and without a flag leaves the
    choice to the sampler."""
    import json

    import engine.__main__ as cli
    import engine.pipeline

    loaded = []
    real = engine.pipeline.load_pipeline
    monkeypatch.setattr(engine.pipeline, "load_pipeline", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    ckpt = random_checkpoint(tmp_path / "ckpt", with_clip=False)
    out = tmp_path / "out"
    assert cli.main(["generate", "a red circle", "--n", "2", "--seed", "3", "--checkpoint", str(ckpt),
                     "--out", str(out), "--native-attention", "--xla-cache-dir", "off"]) == 0
    assert [p.sampler.native_attention for p in loaded] == [True]
    assert len(json.loads((out / "result.json").read_text())["images"]) == 2
    assert cli.main(["generate", "a red circle", "--n", "1", "--seed", "3", "--checkpoint", str(ckpt),
                     "--out", str(tmp_path / "xla"), "--no-native-attention", "--xla-cache-dir", "off"]) == 0
    assert [p.sampler.native_attention for p in loaded] == [True, False]

    seen = {}
    monkeypatch.setattr(cli, "load_checkpoint_pipeline", lambda path, **opts: seen.update(opts) or "pipeline")
    import engine.server

    monkeypatch.setattr(engine.server, "serve", lambda pipeline, settings: seen.update(served=pipeline))
    assert cli.main(["serve", "--checkpoint", str(ckpt), "--native-attention", "--xla-cache-dir", "off"]) == 0
    assert seen["native_attention"] is True and seen["served"] == "pipeline"
    seen.clear()
    assert cli.main(["serve", "--checkpoint", str(ckpt), "--xla-cache-dir", "off"]) == 0
    assert "native_attention" not in seen  # the sampler's default
    assert cli.main(["serve", "--checkpoint", str(ckpt), "--no-native-attention", "--xla-cache-dir", "off"]) == 0
    assert seen["native_attention"] is False
