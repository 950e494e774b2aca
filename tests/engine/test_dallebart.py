"""DalleBart: published param counts/names, checkpoint layouts, cache correctness, parity with min-dalle."""

from __future__ import annotations

import dataclasses
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from bench.reference.mindalle import build_modules
from engine.config import preset
from engine.models.dallebart import DalleBart, param_shapes
from engine.models.layout import count_params, load_dallebart_params, normalize_layout, scan_params, unscan_params
from tests.fakes.dallebart import random_params, tiny_config, write_checkpoint


@functools.cache
def _forward(config, dtype=jnp.float32):
    """One jitted training forward per (config, dtype), shared by the tests (compiles once)."""
    return jax.jit(DalleBart(config, dtype=dtype).apply)


def _inputs(config, batch=2, text_len=None, seed=1):
    rng = np.random.default_rng(seed)
    t = text_len or config.max_text_length
    ids = rng.integers(3, config.encoder_vocab_size, size=(batch, t)).astype(np.int32)
    mask = np.ones((batch, t), np.int32)
    for b in range(batch):  # row b keeps 4 + 3b tokens; the rest is padding (id 1, mask 0)
        keep = min(t, 4 + 3 * b)
        ids[b, keep:] = 1
        mask[b, keep:] = 0
    dec = rng.integers(0, config.num_image_codes, size=(batch, config.image_length)).astype(np.int32)
    dec[:, 0] = config.decoder_start_token_id
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec)


# ----------------------------------------------------------------------------------------------
# shapes and layouts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("mini", 437_833_712), ("mega", 2_587_521_024)])
def test_published_param_counts(name, expected):
    shapes = param_shapes(preset(name))
    assert count_params(shapes) == expected
    flat = traverse_util.flatten_dict(shapes, sep="/")
    cfg = preset(name)
    assert flat["lm_head/kernel"].shape == (cfg.d_model, cfg.image_vocab_size + 1)
    layer = "model/decoder/layers/FlaxBartDecoderLayers"
    assert flat[f"{layer}/GLU_0/Dense_0/kernel"].shape == (cfg.decoder_layers, cfg.d_model, cfg.decoder_ffn_dim)
    assert f"{layer}/LayerNorm_0/scale" not in flat and f"{layer}/LayerNorm_1/scale" in flat
    assert "model/encoder/final_ln/scale" not in flat and "model/encoder/layernorm_embedding/scale" in flat


def test_unscanned_layout_names_and_roundtrip():
    cfg = tiny_config()
    params = random_params(cfg)
    flat_un = traverse_util.flatten_dict(unscan_params(params), sep="/")
    unscanned_shapes = param_shapes(dataclasses.replace(cfg, use_scan=False))
    assert set(flat_un) == set(traverse_util.flatten_dict(unscanned_shapes, sep="/"))
    assert flat_un["model/encoder/layers/FlaxBartEncoderLayer_1/GLU_0/Dense_2/kernel"].shape == (48, 64)
    back = scan_params(unscan_params(params))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # normalize_layout is idempotent and follows config.use_scan
    assert "FlaxBartDecoderLayers" in normalize_layout(params, cfg)["model"]["decoder"]["layers"]
    un = normalize_layout(params, dataclasses.replace(cfg, use_scan=False))
    assert "FlaxBartDecoderLayer_0" in un["model"]["decoder"]["layers"]


@pytest.mark.parametrize("scanned_file", [True, False])
def test_checkpoint_loads_in_both_layouts_with_identical_outputs(tmp_path, scanned_file):
    cfg = tiny_config()
    params = random_params(cfg, seed=3)
    ids, mask, dec = _inputs(cfg)
    ref = _forward(cfg)({"params": params}, ids, mask, dec)
    path = write_checkpoint(tmp_path / "ckpt", params, cfg, scanned=scanned_file)
    for use_scan in (True, False):
        run_cfg = dataclasses.replace(cfg, use_scan=use_scan)
        loaded = load_dallebart_params(path, run_cfg)
        out = _forward(run_cfg)({"params": loaded}, ids, mask, dec)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_checkpoint_with_wrong_shape_names_the_parameter(tmp_path):
    cfg = tiny_config()
    params = unscan_params(random_params(cfg))
    bad = params["model"]["decoder"]["layers"]["FlaxBartDecoderLayer_1"]["GLU_0"]["Dense_1"]
    bad["kernel"] = np.zeros((64, 47), np.float32)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    for use_scan in (True, False):  # the message names the path as written in the file
        with pytest.raises(ValueError, match=r"FlaxBartDecoderLayer_1/GLU_0/Dense_1/kernel has shape \(64, 47\)"):
            load_dallebart_params(tmp_path / "flax_model.msgpack", dataclasses.replace(cfg, use_scan=use_scan))
    scanned = random_params(cfg)
    scanned["model"]["encoder"]["layers"]["FlaxBartEncoderLayers"]["LayerNorm_1"]["scale"] = np.ones((2, 63))
    with pytest.raises(ValueError, match=r"FlaxBartEncoderLayers/LayerNorm_1/scale has shape \(2, 63\)"):
        load_dallebart_params(scanned, cfg)
    good = random_params(cfg)
    del good["model"]["encoder"]["final_ln"]
    with pytest.raises(ValueError, match=r"missing parameter model/encoder/final_ln/bias"):
        load_dallebart_params(good, cfg)
    with pytest.raises(FileNotFoundError):
        load_dallebart_params(tmp_path / "nope", cfg)


def test_load_casts_dtype():
    cfg = tiny_config()
    loaded = load_dallebart_params({"params": random_params(cfg)}, cfg, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------------------------
# cached decoding == full forward
# ----------------------------------------------------------------------------------------------


def _full_decode(use_scan: bool):
    """A tiny model, 3 rows of inputs, their encoder output and the plain (uncached) decoder logits."""
    cfg = tiny_config(use_scan=use_scan)
    model = DalleBart(cfg)
    variables = {"params": normalize_layout(random_params(cfg, seed=5), cfg)}
    ids, mask, dec = _inputs(cfg, batch=3)
    enc = jax.jit(partial(model.apply, method=DalleBart.encode))(variables, ids, mask)
    full = jax.jit(partial(model.apply, method=DalleBart.decode))(variables, dec, enc, mask)
    return cfg, model, variables, mask, dec, enc, full


@pytest.mark.parametrize("use_scan", [True, False])
def test_decode_step_matches_full_decode(use_scan):
    cfg, model, variables, mask, dec, enc, full = _full_decode(use_scan)
    assert full.shape == (3, cfg.image_length, cfg.image_vocab_size + 1) and full.dtype == jnp.float32
    cross = model.apply(variables, enc, method=DalleBart.cross_kv)
    assert len(cross[0]) == cfg.decoder_layers
    assert {k.shape for k in cross[0]} == {(3, 4, cfg.max_text_length, 16)}
    cache = model.init_cache(3, jnp.float32)
    assert len(cache["k"]) == cfg.decoder_layers
    assert {k.shape for k in cache["k"]} == {(3, 4, cfg.image_length, 16)}
    step = jax.jit(lambda t, p, c: model.apply(variables, t, p, c, cross, mask, method=DalleBart.decode_step))
    for pos in range(cfg.image_length):
        logits, cache = step(dec[:, pos], jnp.int32(pos), cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, pos]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blocks", [2, 4])
def test_blocked_cache_decode_step_matches_full_decode(blocks):
    """A cache split into blocks along the positions: the step at ``position`` writes block position // width and
    attends to blocks 0..that one; every step's logits equal the full forward pass's, and the blocks hold exactly
    the one-array cache's K/V."""
    cfg, model, variables, mask, dec, enc, full = _full_decode(False)
    cross = model.apply(variables, enc, method=DalleBart.cross_kv)
    width = cfg.image_length // blocks
    cache, plain = model.init_cache(3, jnp.float32, blocks=blocks), model.init_cache(3, jnp.float32)
    assert {len(layer) for layer in cache["k"]} == {blocks}
    assert {b.shape for layer in cache["v"] for b in layer} == {(3, 4, width, 16)}
    step = jax.jit(lambda t, p, c, seg: model.apply(variables, t, p, c, cross, mask, seg,
                                                    method=DalleBart.decode_step), static_argnums=3)
    plain_step = jax.jit(lambda t, p, c: model.apply(variables, t, p, c, cross, mask, method=DalleBart.decode_step))
    for pos in range(cfg.image_length):
        logits, cache = step(dec[:, pos], jnp.int32(pos), cache, pos // width)
        _, plain = plain_step(dec[:, pos], jnp.int32(pos), plain)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, pos]), atol=1e-4, rtol=1e-4)
    for layer, one in zip(cache["k"], plain["k"], strict=True):
        np.testing.assert_allclose(np.concatenate([np.asarray(b) for b in layer], axis=2), np.asarray(one), atol=1e-5)
    with pytest.raises(ValueError, match="needs a segment"):
        step(dec[:, 0], jnp.int32(0), cache, blocks)
    with pytest.raises(ValueError, match="must divide"):
        model.init_cache(3, jnp.float32, blocks=cfg.image_length + 1)


def test_transposed_kernels_decode_layout_gives_the_same_logits():
    """The sampler's decode layout: every dense kernel stored (out, in); same outputs, other shapes; a runtime
    choice that never reaches config.json."""
    from engine.config import DalleBartConfig
    from engine.models.layout import to_decode_layout

    cfg = tiny_config(use_scan=False)
    t_cfg = dataclasses.replace(cfg, transposed_kernels=True)
    params = normalize_layout(random_params(cfg, seed=7), cfg)
    t_params = to_decode_layout(params)
    flat, t_flat = (traverse_util.flatten_dict(p, sep="/") for p in (params, t_params))
    shapes = traverse_util.flatten_dict(param_shapes(t_cfg), sep="/")
    kernels = [k for k in flat if k.endswith("/kernel")]
    assert len(kernels) == 1 + 7 * cfg.encoder_layers + 11 * cfg.decoder_layers  # lm_head; 4+3; 4+4+3
    for path, x in flat.items():
        want = x.T if path.endswith("/kernel") else x
        np.testing.assert_array_equal(np.asarray(t_flat[path]), np.asarray(want))
        assert shapes[path].shape == want.shape
    ids, mask, dec = _inputs(cfg, batch=2)
    plain = _forward(cfg)({"params": params}, ids, mask, dec)
    transposed = _forward(t_cfg)({"params": t_params}, ids, mask, dec)
    np.testing.assert_allclose(np.asarray(transposed), np.asarray(plain), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="expected 2-D"):  # scanned (stacked) kernels have no decode layout
        to_decode_layout(scan_params(params))
    bf16 = to_decode_layout(params, jnp.bfloat16, host=True)  # numpy leaves for a mesh, cast in passing
    assert isinstance(bf16["lm_head"]["kernel"], np.ndarray) and bf16["lm_head"]["kernel"].dtype == jnp.bfloat16
    assert bf16["lm_head"]["kernel"].shape == flat["lm_head/kernel"].shape[::-1]

    assert "transposed_kernels" not in t_cfg.to_dict()
    assert DalleBartConfig.from_dict(dict(cfg.to_dict(), transposed_kernels=True)).transposed_kernels is False


def test_gradient_checkpointing_same_forward_and_grads():
    cfg = tiny_config(image_length=4, max_text_length=4)
    params = random_params(cfg, seed=2)
    ids, mask, dec = _inputs(cfg)

    def loss(p, c):
        return DalleBart(c).apply({"params": p}, ids, mask, dec).mean()

    g_ref = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    g_rem = jax.jit(jax.grad(loss), static_argnums=1)(params, dataclasses.replace(cfg, gradient_checkpointing=True))
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_rem), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_close_to_float32():
    cfg = tiny_config()
    params = random_params(cfg, seed=4)
    ids, mask, dec = _inputs(cfg)
    ref = _forward(cfg)({"params": params}, ids, mask, dec)
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = _forward(cfg, jnp.bfloat16)({"params": p16}, ids, mask, dec)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_text_longer_than_table_is_rejected():
    cfg = tiny_config()
    ids = jnp.ones((1, cfg.max_text_length + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_text_length"):
        DalleBart(cfg).apply({"params": random_params(cfg)}, ids, ids, method=DalleBart.encode)


# ----------------------------------------------------------------------------------------------
# numerical parity with min-dalle (PyTorch) on the same random weights
# ----------------------------------------------------------------------------------------------


def test_parity_with_min_dalle():
    torch = pytest.importorskip("torch")
    pytest.importorskip("min_dalle.models.dalle_bart_encoder")
    dec_mod = pytest.importorskip("min_dalle.models.dalle_bart_decoder")
    image_len = dec_mod.IMAGE_TOKEN_COUNT  # min-dalle hard-codes 256 decoder positions
    cfg = tiny_config(image_length=image_len, image_vocab_size=64, valid_image_codes=64)
    params = random_params(cfg, seed=11, std=0.15)
    model = DalleBart(cfg)
    variables = {"params": params}

    # min-dalle's encoder runs exactly 2 rows ([uncond; cond]); its mask is `token != 1`
    ids, mask, _ = _inputs(cfg, batch=2)
    t_enc, t_dec = build_modules(cfg, params)

    with torch.no_grad():
        t_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        t_hidden = t_enc.forward(t_ids)
        enc = jax.jit(partial(model.apply, method=DalleBart.encode))(variables, ids, mask)
        np.testing.assert_allclose(np.asarray(enc), t_hidden.numpy(), atol=1e-4, rtol=0)

        # decoder: one image per branch (min-dalle feeds the same token to both rows)
        steps = 6
        rng = np.random.default_rng(0)
        tokens = np.concatenate([[cfg.decoder_start_token_id], rng.integers(0, 64, size=steps - 1)]).astype(np.int64)
        t_mask = t_ids.not_equal(1)[:, None, None, :]
        t_state = torch.zeros(cfg.decoder_layers, 4, image_len, cfg.d_model)
        cross = model.apply(variables, enc, method=DalleBart.cross_kv)
        cache = model.init_cache(2, jnp.float32)
        dec_ids = jnp.asarray(np.tile(tokens[None], (2, 1)), jnp.int32)
        full = jax.jit(partial(model.apply, method=DalleBart.decode))(variables, dec_ids, enc, mask)
        step = jax.jit(partial(model.apply, method=DalleBart.decode_step))
        for pos in range(steps):
            t_logits, t_state = t_dec.forward(
                attention_mask=t_mask,
                encoder_state=t_hidden,
                attention_state=t_state,
                prev_tokens=torch.tensor([[tokens[pos]]]),
                token_index=torch.tensor([pos]),
            )
            tok = jnp.full((2,), int(tokens[pos]), jnp.int32)
            logits, cache = step(variables, tok, jnp.int32(pos), cache, cross, mask)
            want = t_logits[:, -1].numpy()
            assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
            np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)
            np.testing.assert_allclose(np.asarray(full[:, pos]), want, atol=1e-4, rtol=0)
