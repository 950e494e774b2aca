"""The VQGAN trainer: engine-layout checkpoints that encode, codebook maintenance (EMA, dead-code restarts),
the edge and palette loss terms, decoder-only fine-tunes and wider decoders on the saved tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import weights
from engine.config import ConfigError, VQGANConfig
from training.__main__ import main
from training.data.parquet import iter_token_shards
from training.encode import load_vqgan
from training.train_vqgan import VQGANLoss, make_codebook_update


def test_vqgan_checkpoint_loads_in_the_engine_layout_and_encodes(demo):
    cfg = VQGANConfig.from_json(demo / "vqgan")
    assert (cfg.resolution, cfg.downsample_factor, cfg.n_embed, cfg.norm_groups) == (32, 4, 32, 2)
    model, _, params = load_vqgan(demo / "vqgan")
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 32, 32, 3)))["params"], jax.random.PRNGKey(0))
    loaded = weights.load_params(demo / "vqgan", shapes)
    assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
    rows = list(iter_token_shards(demo / "tokens", encoding_length=cfg.grid_size**2))
    assert len(rows) == 48
    codes = np.stack([r["encoding"] for r in rows])
    assert codes.min() >= 0 and codes.max() < cfg.n_embed
    assert sum(r["caption"] == "" for r in rows) >= 1  # the dataset's blanked captions are kept
    # the shards hold exactly what the saved VQGAN gives for those images
    from training.data.shapes import ShapesConfig, ShapesDataset

    ds = ShapesDataset(0, ShapesConfig(image_size=32, factor=4))
    images = jnp.asarray(np.stack([ds[i].image for i in range(4)]) / 255.0, jnp.float32)
    again = jax.jit(lambda p, x: model.apply({"params": p}, x, method=type(model).encode)[1])(loaded, images)
    np.testing.assert_array_equal(np.asarray(again), codes[:4])
    img = jax.jit(lambda p, c: model.apply({"params": p}, c, method=type(model).decode_code))(loaded, again[:2])
    assert img.shape == (2, 32, 32, 3)


def test_ema_codebook_update_and_dead_code_restart():
    n, d = 4, 2
    weights_ = VQGANLoss(ema=True, usage_decay=0.5, dead_threshold=0.3)
    update = make_codebook_update(weights_)
    params = {"quantize": {"embedding": {"embedding": jnp.zeros((n, d))}}, "other": jnp.ones(3)}
    z = jnp.asarray([[1.0, 1.0], [3.0, 3.0], [10.0, -10.0]])
    counts = jnp.asarray([2.0, 1.0, 0.0, 0.0])
    zsum = jnp.asarray([[4.0, 4.0], [10.0, -10.0], [0.0, 0.0], [0.0, 0.0]])
    extra = {"usage": jnp.asarray([1.0, 1.0, 1.0, 0.0]), "embed_sum": jnp.asarray([[2.0, 2.0], [0, 0], [5, 5], [0, 0]])}
    qerr = jnp.asarray([0.5, 0.5, 0.5])
    new_params, new_extra = update(params, extra, {"_counts": counts, "_z": z, "_zsum": zsum, "_qerr": qerr},
                                   jnp.int32(0), jax.random.PRNGKey(0))
    cb = np.asarray(new_params["quantize"]["embedding"]["embedding"])
    usage = np.asarray(new_extra["usage"])
    # code 0: usage .5*1+.5*2 = 1.5, sum .5*[2,2]+.5*[4,4] = [3,3] -> mean [2,2]
    np.testing.assert_allclose(cb[0], [2.0, 2.0])
    np.testing.assert_allclose(cb[1], [5.0, -5.0] / np.float32(1.0))
    np.testing.assert_allclose(usage[:3], [1.5, 1.0, 0.5])
    # code 3 never used (usage 0 < threshold): restarted onto one of the batch's encoder outputs
    assert any(np.allclose(cb[3], row) for row in np.asarray(z))
    assert usage[3] == pytest.approx(0.6)
    np.testing.assert_array_equal(np.asarray(new_params["other"]), np.ones(3))


@pytest.mark.parametrize("on_error", [True, False])
def test_dead_codes_restart_where_the_quantisation_error_is(on_error):
    """k-means++-style restarts: every dead code lands on the one badly coded output; uniform ones spread."""
    n, d = 64, 2
    update = make_codebook_update(VQGANLoss(ema=True, dead_threshold=0.5, restart_on_error=on_error))
    params = {"quantize": {"embedding": {"embedding": jnp.zeros((n, d))}}}
    z = jnp.concatenate([jnp.zeros((31, d)), jnp.asarray([[7.0, -7.0]])])
    aux = {"_counts": jnp.zeros((n,)), "_z": z, "_zsum": jnp.zeros((n, d)),
           "_qerr": jnp.zeros((32,)).at[31].set(98.0)}
    new_params, _ = update(params, {"usage": jnp.zeros((n,)), "embed_sum": jnp.zeros((n, d))}, aux, jnp.int32(0),
                           jax.random.PRNGKey(1))
    cb = np.asarray(new_params["quantize"]["embedding"]["embedding"])
    on_outlier = np.all(cb == [7.0, -7.0], axis=1).sum()
    if on_error:
        assert on_outlier == n
    else:  # one output in 32 drawn uniformly
        assert on_outlier < n // 4


def test_edge_map_marks_the_outline_and_edge_weight_leaves_flat_images_alone():
    from training.train_vqgan import _step_fns, edge_map, small_vqgan_config

    x = np.zeros((1, 32, 32, 3), np.float32)
    x[:, :, 16:] = 0.8
    edge = np.asarray(edge_map(jnp.asarray(x)))[0, :, :, 0]
    assert edge[:, 13:19].all() and not edge[:, :12].any() and not edge[:, 20:].any()

    config = small_vqgan_config(32, 8, ch=8, n_embed=16, embed_dim=4, norm_groups=2)
    flat = {"images": jnp.full((2, 32, 32, 3), 0.3)}
    plain_loss, _, init = _step_fns(config, VQGANLoss())
    weighted_loss, _, _ = _step_fns(config, VQGANLoss(edge_weight=4.0))
    params = init(jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(2)
    np.testing.assert_allclose(weighted_loss(params, flat, rng)[0], plain_loss(params, flat, rng)[0], rtol=1e-6)
    edged = {"images": jnp.asarray(np.concatenate([x, x]))}
    plain_l1 = float(plain_loss(params, edged, rng)[1]["l1"])
    assert float(weighted_loss(params, edged, rng)[1]["l1"]) != pytest.approx(plain_l1)


def test_palette_cross_entropy_pays_for_pixels_on_the_wrong_side_of_a_colour_boundary():
    """Exact colours cost ~0; a blurred star point (half-way to the background) costs more than the same L2 error
    spread so thin that every pixel still snaps to the right colour; the loss option adds the term."""
    from training.data.captions import COLOURS
    from training.train_vqgan import _step_fns, palette_cross_entropy, small_vqgan_config

    red, blue = (np.asarray(COLOURS[c], np.float32) / 255.0 for c in ("red", "blue"))
    x = np.broadcast_to(blue, (1, 8, 8, 3)).copy()
    x[0, 2:6, 2:6] = red
    assert float(palette_cross_entropy(jnp.asarray(x), jnp.asarray(x), 0.02)) < 1e-3
    half = x.copy()
    half[0, 2:6, 2:4] = 0.4 * red + 0.6 * blue  # 8 pixels now nearer blue than red
    spread = x + (np.sqrt(np.sum((half - x) ** 2) / x.size) * np.sign(blue - red)).astype(np.float32)
    assert np.sum((half - x) ** 2) == pytest.approx(np.sum((spread - x) ** 2), rel=1e-4)  # same L2 error
    ce_half = float(palette_cross_entropy(jnp.asarray(half), jnp.asarray(x), 0.02))
    ce_spread = float(palette_cross_entropy(jnp.asarray(spread), jnp.asarray(x), 0.02))
    assert ce_half > 10 * ce_spread

    config = small_vqgan_config(32, 8, ch=8, n_embed=16, embed_dim=4, norm_groups=2)
    plain, _, init = _step_fns(config, VQGANLoss())
    with_palette, _, _ = _step_fns(config, VQGANLoss(palette_weight=0.5))
    params, rng = init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1)
    batch = {"images": jnp.asarray(np.tile(x, (2, 4, 4, 1)))}  # (2, 32, 32, 3)
    (a, ma), (b, _) = plain(params, batch, rng), with_palette(params, batch, rng)
    assert float(b) == pytest.approx(float(a) + 0.5 * float(ma["palette_ce"]), rel=1e-5)


def test_vqgan_cli_passes_the_loss_options(tmp_path, monkeypatch):
    import training.train_vqgan as tv

    seen = {}

    def fake_train(out, config, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(tv, "train_vqgan", fake_train)
    with pytest.raises(SystemExit):
        main(["vqgan", "--out", str(tmp_path / "v"), "--steps", "1", "--edge-weight", "4", "--dead-threshold", "0.01",
              "--uniform-restarts", "--no-progress"])
    assert seen["loss"] == VQGANLoss(edge_weight=4.0, dead_threshold=0.01, restart_on_error=False)
    with pytest.raises(SystemExit):
        main(["vqgan", "--out", str(tmp_path / "v"), "--steps", "1", "--palette-weight", "0.1", "--no-progress"])
    assert seen["loss"] == VQGANLoss(palette_weight=0.1)
    with pytest.raises(SystemExit):
        main(["vqgan", "--out", str(tmp_path / "v"), "--steps", "1", "--no-progress"])
    assert seen["loss"] == VQGANLoss()


def test_decoder_only_finetune_keeps_the_tokens_and_trains_the_decoder(demo, tmp_path):
    """--decoder-only: encoder, quant_conv and codebook are bit-identical afterwards (same tokens), the decoder
    moved; a config mismatch or a missing --init-from is a one-line error."""
    out = tmp_path / "vq2"
    argv = ["vqgan", "--out", str(out), "--init-from", str(demo / "vqgan"), "--decoder-only", "--steps", "6",
            "--image-size", "32", "--factor", "4", "--ch", "8", "--n-embed", "32", "--embed-dim", "8",
            "--norm-groups", "2", "--batch-size", "4", "--lr", "3e-3", "--warmup", "1", "--no-progress",
            "--log-every", "2"]
    assert main(argv) == 0
    _, _, before = load_vqgan(demo / "vqgan")
    _, _, after = load_vqgan(out)
    for part in ("encoder", "quant_conv", "quantize"):
        for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part]), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), part
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(before["decoder"]), jax.tree.leaves(after["decoder"]), strict=True)]
    assert any(moved)

    # continuing needs no architecture flags: unset ones take the saved config (a flag still overrides)
    assert main(["vqgan", "--out", str(tmp_path / "vq4"), "--init-from", str(out), "--decoder-only", "--steps", "1",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert VQGANConfig.from_json(tmp_path / "vq4") == VQGANConfig.from_json(out)

    assert main(["vqgan", "--out", str(tmp_path / "x"), "--decoder-only", "--steps", "1"]) == 2
    bad = [a if a != "8" else "16" for a in argv]  # a different --ch: not the saved config
    bad[bad.index(str(out))] = str(tmp_path / "vq3")
    assert main(bad) == 2


def test_a_wider_decoder_trains_on_the_saved_tokens(demo, tmp_path):
    """--decoder-only --decoder-ch-mult: a new decoder of another width on the saved encoder and codebook (same
    tokens), exported with its own multipliers and loaded by the engine; without --decoder-only it is refused."""
    out = tmp_path / "wide"
    argv = ["vqgan", "--out", str(out), "--init-from", str(demo / "vqgan-base"), "--decoder-only",
            "--decoder-ch-mult", "2,2,2", "--steps", "4", "--batch-size", "2", "--lr", "3e-3", "--warmup", "1",
            "--no-progress", "--log-every", "2"]
    assert main(argv) == 0
    saved = VQGANConfig.from_json(demo / "vqgan-base")
    wide = VQGANConfig.from_json(out)
    assert wide.decoder_ch_mult == (2, 2, 2) and wide.ch_mult == saved.ch_mult
    assert "decoder_ch_mult" not in saved.to_dict()  # the published layout keeps no such key when unset
    _, _, before = load_vqgan(demo / "vqgan-base")
    _, _, after = load_vqgan(out)
    for part in ("encoder", "quant_conv", "quantize"):
        for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part]), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), part
    width = {k: v["kernel"].shape[-1] for k, v in after["decoder"].items() if k == "conv_in"}
    assert width == {"conv_in": saved.ch * 2}  # the deepest level: ch * 2 instead of ch * ch_mult[-1]
    model, _, params = load_vqgan(out)  # the engine's module builds the wider decoder from the config alone
    codes = jnp.zeros((2, saved.grid_size**2), jnp.int32)
    assert model.apply({"params": params}, codes, method=model.decode_code).shape == (2, 32, 32, 3)

    argv[argv.index("--decoder-only")] = "--no-progress"
    assert main([*argv[:1], "--out", str(tmp_path / "refused"), *argv[3:]]) == 2
    with pytest.raises(ConfigError, match="decoder_ch_mult"):
        VQGANConfig.from_dict({**saved.to_dict(), "decoder_ch_mult": [1, 2]})


def test_an_upsampling_decoder_draws_larger_images_from_the_same_tokens(demo, tmp_path):
    """--decoder-ch-mult with one entry more than the encoder's levels: a decoder that draws 2x the encoder's
    resolution from the saved tokens; the encoder sees the larger dataset images box-filtered, and encoding them
    gives the tokens the shards already hold."""
    out = tmp_path / "up"
    argv = ["vqgan", "--out", str(out), "--init-from", str(demo / "vqgan-base"), "--decoder-only",
            "--decoder-ch-mult", "1,1,2,2", "--steps", "4", "--batch-size", "2", "--lr", "3e-3", "--warmup", "1",
            "--no-progress", "--log-every", "2"]
    assert main(argv) == 0
    saved = VQGANConfig.from_json(demo / "vqgan-base")
    up = VQGANConfig.from_json(out)
    assert (up.resolution, up.grid_size, up.output_resolution, up.upsample_factor) == (32, 8, 64, 2)
    model, _, params = load_vqgan(out)
    codes = jnp.zeros((2, saved.grid_size**2), jnp.int32)
    assert model.apply({"params": params}, codes, method=model.decode_code).shape == (2, 64, 64, 3)

    from training.data.shapes import ShapesConfig, ShapesDataset
    from training.encode import Encoder

    encoder = Encoder(model, params, batch_size=4)
    big = np.stack([ShapesDataset(0, ShapesConfig(image_size=64, factor=8))[i].image for i in range(4)])
    small = big.reshape(4, 32, 2, 32, 2, 3).mean(axis=(2, 4)) / 255.0
    np.testing.assert_array_equal(encoder(big), encoder(small.astype(np.float32)))
    with pytest.raises(ValueError, match="expected images"):
        encoder(np.zeros((1, 48, 48, 3), np.uint8))
    with pytest.raises(ConfigError, match="decoder_ch_mult"):
        VQGANConfig.from_dict({**saved.to_dict(), "decoder_ch_mult": [1, 2]})


def test_a_vqgan_with_an_upsampling_decoder_trains_from_scratch(tmp_path):
    """The whole VQGAN trained with a 2x decoder: the targets are drawn at the output size, the loss falls, and
    the exported checkpoint reconstructs at the output size."""
    from training.train_vqgan import small_vqgan_config, train_vqgan

    config = small_vqgan_config(32, 4, ch=8, n_embed=16, embed_dim=4, norm_groups=2, decoder_ch_mult=(1, 1, 2, 2))
    assert config.output_resolution == 64
    from training.optim import OptimConfig

    optim = OptimConfig(name="adamw", learning_rate=3e-3, warmup_steps=1, decay="constant", decay_steps=1)
    res = train_vqgan(tmp_path / "vq", config, steps=12, batch_size=2, optim=optim, eval_images=4,
                      log_every=1, progress=False)
    losses = res.result.losses
    assert len(losses) == 12 and min(losses[-3:]) < losses[0]
    assert res.eval_metrics["psnr"] > 0
    model, cfg, params = load_vqgan(tmp_path / "vq")
    assert cfg.output_resolution == 64
    out = model.apply({"params": params}, jnp.zeros((1, cfg.grid_size**2), jnp.int32), method=model.decode_code)
    assert out.shape == (1, 64, 64, 3)
