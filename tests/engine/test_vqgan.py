"""VQGAN: parity with min-dalle's PyTorch detokenizer, published param tree, quantiser, training path."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from engine.config import ConfigError, VQGANConfig, preset
from engine.convert import vqgan_from_torch
from engine.models.vqgan import VQModel, decoder_param_names, param_shapes

torch = pytest.importorskip("torch")

TINY = VQGANConfig(
    resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8, embed_dim=8,
    n_embed=32,
)


def _min_dalle_detokenizer_module():
    """Import min-dalle's detokenizer file directly (its package __init__ pulls in ``requests``)."""
    try:
        dist = importlib.metadata.distribution("min-dalle")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("min-dalle is not installed")
    path = pathlib.Path(dist.locate_file("min_dalle/models/vqgan_detokenizer.py"))
    spec = importlib.util.spec_from_file_location("_min_dalle_vqgan_detokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def published_shapes():
    return flatten_dict(param_shapes(preset("vqgan-f16")), sep="/")


@pytest.fixture(scope="module")
def tiny_params():
    # random values on the eval_shape tree: no init compile (slow on the shared CI machine)
    shapes = jax.eval_shape(lambda: VQModel(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32), shapes)


def test_published_tree_names_and_sizes(published_shapes):
    f = published_shapes
    assert f["encoder/conv_in/kernel"].shape == (3, 3, 3, 128)
    assert f["quantize/embedding/embedding"].shape == (16384, 256)
    assert f["quant_conv/kernel"].shape == (1, 1, 256, 256)
    assert f["post_quant_conv/kernel"].shape == (1, 1, 256, 256)
    assert f["decoder/conv_in/kernel"].shape == (3, 3, 256, 512)
    assert f["decoder/conv_out/kernel"].shape == (3, 3, 128, 3)
    assert f["encoder/down_4/attn_1/q/kernel"].shape == (1, 1, 512, 512)
    assert f["decoder/up_4/attn_2/proj_out/kernel"].shape == (1, 1, 512, 512)
    assert f["encoder/down_3/downsample/conv/kernel"].shape == (3, 3, 256, 256)
    assert f["decoder/up_3/block_0/nin_shortcut/kernel"].shape == (1, 1, 512, 256)
    assert "encoder/down_4/downsample/conv/kernel" not in f
    assert "decoder/up_0/upsample/conv/kernel" not in f
    assert "decoder/up_3/attn_0/q/kernel" not in f  # attention only at 16×16
    assert not any(k.startswith("model/") for k in f)


def test_decoder_param_count_equals_min_dalle(published_shapes):
    mod = _min_dalle_detokenizer_module()
    with torch.device("meta"):
        det = mod.VQGanDetokenizer()
    theirs = sum(p.numel() for p in det.parameters())
    ours = sum(v.size for k, v in published_shapes.items() if k.split("/")[0] in decoder_param_names())
    assert ours == theirs == 46_709_891


def test_decode_matches_min_dalle(published_shapes):
    mod = _min_dalle_detokenizer_module()
    torch.manual_seed(0)
    det = mod.VQGanDetokenizer().eval()
    # min-dalle builds nn.GroupNorm with torch's default eps 1e-5; taming / vqgan-jax (and we) use 1e-6.
    for m in det.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-6
    params = vqgan_from_torch(det.state_dict())
    flat = flatten_dict(params, sep="/")
    expected = {k: v for k, v in published_shapes.items() if k.split("/")[0] in decoder_param_names()}
    assert set(flat) == set(expected)
    assert all(flat[k].shape == expected[k].shape for k in flat)

    # a 8×8 grid (128 px) keeps the test quick; both decoders are fully convolutional apart from the codebook
    codes = torch.randint(0, 16384, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = det.embedding(codes).view(2, 8, 8, 256).permute(0, 3, 1, 2)
        ref = det.decoder(det.post_quant_conv(z)).permute(0, 2, 3, 1).numpy()  # pre-clip, NHWC

    cfg = preset("vqgan-f16")
    decode = jax.jit(
        lambda p, c, clip: VQModel(cfg).apply({"params": p}, c, clip, method=VQModel.decode_code),
        static_argnums=2,
    )
    jparams = jax.tree.map(jnp.asarray, params)
    out = np.asarray(decode(jparams, jnp.asarray(codes.numpy()), False))
    assert out.shape == (2, 128, 128, 3)
    assert ref.std() > 0.1  # a non-trivial output
    assert np.abs(out - ref).max() <= 1e-4
    # min-dalle's images are clip(decoder output, 0, 1) · 255: our clip=True path gives the same in [0, 1]
    clipped = np.asarray(decode(jparams, jnp.asarray(codes.numpy()), True))
    np.testing.assert_allclose(clipped * 255, np.clip(ref, 0.0, 1.0) * 255, atol=255 * 1e-4)


def test_quantiser_picks_nearest_code(tiny_params):
    model = VQModel(TINY)
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(TINY.n_embed, TINY.embed_dim)).astype(np.float32)
    params = jax.tree.map(lambda x: x, tiny_params)
    params["quantize"]["embedding"]["embedding"] = jnp.asarray(codebook)

    # crafted: each latent is a codebook row plus small noise → that row's index
    want = rng.integers(0, TINY.n_embed, size=(2, 8 * 8))
    z = codebook[want] + 0.01 * rng.normal(size=want.shape + (TINY.embed_dim,)).astype(np.float32)
    z = z.reshape(2, 8, 8, TINY.embed_dim)
    zq, idx, losses = model.apply({"params": params}, jnp.asarray(z), method=lambda m, x: m.quantize(x))
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_allclose(np.asarray(zq), codebook[want].reshape(z.shape), atol=1e-6)

    # arbitrary latents: brute-force squared distance agrees
    z2 = rng.normal(size=(1, 8, 8, TINY.embed_dim)).astype(np.float32)
    _, idx2, losses2 = model.apply({"params": params}, jnp.asarray(z2), method=lambda m, x: m.quantize(x))
    d = ((z2.reshape(-1, 1, TINY.embed_dim) - codebook[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(idx2)[0], d.argmin(1))
    mse = ((z2.reshape(-1, TINY.embed_dim) - codebook[d.argmin(1)]) ** 2).mean()
    assert float(losses2["codebook_loss"]) == pytest.approx(mse, rel=1e-5)
    assert float(losses2["commitment_loss"]) == pytest.approx(mse, rel=1e-5)
    assert float(losses2["quant_loss"]) == pytest.approx(1.25 * mse, rel=1e-5)


def test_straight_through_and_loss_gradients(tiny_params):
    model = VQModel(TINY)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))

    def loss(params, images):
        recon, aux = model.apply({"params": params}, images)
        return jnp.mean((recon - images) ** 2) + aux["quant_loss"]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    first, grads = value_and_grad(tiny_params, x)
    g = flatten_dict(grads, sep="/")
    # the reconstruction loss reaches the encoder only through the straight-through estimator
    assert float(jnp.abs(g["encoder/conv_in/kernel"]).sum()) > 0
    assert float(jnp.abs(g["decoder/conv_out/kernel"]).sum()) > 0
    # the codebook moves only through the codebook loss (rows that were picked)
    assert float(jnp.abs(g["quantize/embedding/embedding"]).sum()) > 0
    # and a few plain gradient steps lower the training loss
    params = tiny_params
    for _ in range(5):
        params = jax.tree.map(lambda p, d: p - 1e-3 * d / (jnp.linalg.norm(d) + 1e-8), params, grads)
        value, grads = value_and_grad(params, x)
    assert float(value) < float(first)


def test_encode_decode_round_trip_shapes(tiny_params):
    model = VQModel(TINY)
    x = jax.random.uniform(jax.random.PRNGKey(2), (3, 16, 16, 3))

    @jax.jit
    def run(p, images):
        v = {"params": p}
        zq, idx = model.apply(v, images, method=VQModel.encode)
        from_codes = model.apply(v, idx, method=VQModel.decode_code)
        from_codes_clipped = model.apply(v, idx, True, method=VQModel.decode_code)
        from_latents = model.apply(v, zq, method=VQModel.decode)
        recon, aux = model.apply(v, images)
        return zq, idx, from_codes, from_codes_clipped, from_latents, recon, aux

    zq, idx, from_codes, clipped, from_latents, recon, aux = run(tiny_params, x)
    assert zq.shape == (3, 8, 8, 8) and idx.shape == (3, 64) and idx.dtype == jnp.int32
    assert int(idx.min()) >= 0 and int(idx.max()) < TINY.n_embed
    assert from_codes.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(from_codes), np.asarray(from_latents), atol=1e-5)
    np.testing.assert_allclose(np.asarray(recon), np.asarray(from_codes), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), np.asarray(idx))
    np.testing.assert_allclose(np.asarray(clipped), np.clip(np.asarray(from_codes), 0.0, 1.0), atol=1e-6)
    assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0
    assert float(jnp.abs(from_codes).max()) > 1.0  # random weights: clipping really happened


def test_bad_group_count_is_a_clear_error():
    cfg = VQGANConfig(resolution=8, ch=24, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), z_channels=4,
                      embed_dim=4, n_embed=8)
    with pytest.raises(ConfigError, match="not divisible"):
        jax.eval_shape(lambda: VQModel(cfg, norm_groups=16).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))


def test_bad_code_shape_is_a_clear_error(tiny_params):
    with pytest.raises(ValueError, match="square grid"):
        VQModel(TINY).apply({"params": tiny_params}, jnp.zeros((1, 10), jnp.int32), method=VQModel.decode_code)
