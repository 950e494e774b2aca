"""The model trainers on tiny configs: the CLI pipeline (vqgan → encode → dallebart → clip), engine-layout
checkpoints that load back, decreasing losses, codebook maintenance, caption blanking and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import weights
from engine.config import CLIPConfig, ConfigError, DalleBartConfig, VQGANConfig
from engine.models.clip import CLIPModel, dummy_inputs
from engine.models.dallebart import DalleBart, init_params, load_dallebart_params
from engine.text import CLIPTokenizer, DalleBartTokenizer
from training.__main__ import main
from training.checkpoint import Checkpointer
from training.data.parquet import iter_token_shards
from training.encode import encode_shapes, load_vqgan
from training.metrics_log import read_metrics
from training.optim import OptimConfig
from training.prefix_noise import PrefixNoise
from training.train_dallebart import BlankCaptions, make_loss, train_dallebart
from training.train_vqgan import VQGANLoss, make_codebook_update

TINY = [
    "--vqgan-steps", "24", "--num-images", "48", "--dallebart-steps", "24", "--clip-steps", "16",
    "--image-size", "32", "--factor", "4", "--ch", "8", "--n-embed", "32", "--embed-dim", "8", "--norm-groups", "2",
    "--d-model", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--max-text-length", "24",
    "--vocab-size", "300", "--clip-vocab-size", "600", "--clip-image-size", "32", "--patch", "8", "--width", "32",
    "--clip-layers", "1", "--clip-heads", "2", "--batch-size", "8", "--log-every", "4", "--save-every", "12",
    "--lr", "3e-3", "--warmup", "2", "--no-progress", "--vqgan-decoder-steps", "16", "--scale", "3", "--top-k", "8",
    "--decoder-ch-mult", "2,2,2", "--palette-weight", "0.1",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "ckpt"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(path)]


@pytest.mark.parametrize("part", ["vqgan-base", "dallebart", "clip"])
def test_demo_trains_each_model_and_its_loss_decreases(demo, part):
    """Each model (vqgan-base: the full VQGAN, before its decoder fine-tune) logged, decreased, checkpointed."""
    losses = _losses(demo / f"{part}-train" / "metrics.jsonl")
    assert len(losses) >= 4 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    summary = json.loads((demo / part / "training.json").read_text())
    assert summary["steps"] > 0 and summary["steps_per_s"] > 0
    # orbax training checkpoints sit beside (not inside) the engine checkpoint
    assert Checkpointer(demo / f"{part}-train" / "checkpoints").all_steps()[-1] == summary["steps"]
    assert not (demo / part / "checkpoints").exists()


def test_demo_records_its_sampling_and_tokens_come_from_the_base_vqgan(demo):
    meta = json.loads((demo / "checkpoint.json").read_text())
    assert meta["sampling"] == {"condition_scale": 3.0, "top_k": 8}
    assert meta["steps"]["vqgan_decoder"] == 16
    assert json.loads((demo / "vqgan" / "training.json").read_text())["steps"] == 16
    assert Checkpointer(demo / "vqgan-train" / "checkpoints").all_steps()[-1] == 16
    assert json.loads((demo / "safety.json").read_text())["concepts"][0]["name"] == "demo-black-star"
    _, _, base = load_vqgan(demo / "vqgan-base")
    _, _, final = load_vqgan(demo / "vqgan")
    for a, b in zip(jax.tree.leaves(base["quantize"]), jax.tree.leaves(final["quantize"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the wider decoder (and the palette term) belong to the decoder stage: the base keeps the encoder's widths
    assert VQGANConfig.from_json(demo / "vqgan-base").decoder_ch_mult is None
    assert VQGANConfig.from_json(demo / "vqgan").decoder_ch_mult == (2, 2, 2)
    assert read_metrics(demo / "vqgan-train" / "metrics.jsonl")[-1]["palette_ce"] > 0


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


def test_dallebart_checkpoint_loads_with_its_tokenizer(demo):
    d = demo / "dallebart"
    for name in ("config.json", "flax_model.msgpack", "tokenizer.json"):
        assert (d / name).is_file(), name
    cfg = DalleBartConfig.from_json(d)
    assert (cfg.image_vocab_size, cfg.image_length, cfg.decoder_start_token_id) == (32, 64, 32)
    tok = DalleBartTokenizer.from_dir(d, max_length=cfg.max_text_length, normalize=cfg.normalize_text)
    assert tok.vocab_size <= cfg.encoder_vocab_size
    params = load_dallebart_params(d, cfg)
    batch = tok(["a red circle", ""])
    fwd = jax.jit(lambda p, i, m, d: DalleBart(cfg).apply({"params": p}, i, m, d))
    logits = fwd(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                 jnp.full((2, 3), 32, jnp.int32))
    assert logits.shape == (2, 3, 33) and bool(jnp.all(jnp.isfinite(logits)))


def test_clip_checkpoint_loads(demo):
    d = demo / "clip"
    cfg = CLIPConfig.from_json(d)
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    shapes = jax.eval_shape(lambda r: CLIPModel(cfg).init(r, *dummy_inputs(cfg))["params"], jax.random.PRNGKey(0))
    params = weights.load_params(d, shapes)
    assert float(params["logit_scale"]) <= np.log(100.0) + 1e-6
    summary = json.loads((d / "training.json").read_text())
    assert 0.0 <= summary["eval"]["i2t_accuracy"] <= 1.0


def test_dallebart_loss_is_next_token_cross_entropy():
    cfg = DalleBartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_vocab_size=20,
                          image_vocab_size=10, max_text_length=6, image_length=5, decoder_start_token_id=10)
    model = DalleBart(cfg)
    params = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(1))
    r = np.random.default_rng(0)
    batch = {"input_ids": r.integers(0, 20, (3, 6)).astype(np.int32), "attention_mask": np.ones((3, 6), np.int32),
             "labels": r.integers(0, 10, (3, 5)).astype(np.int32)}
    loss, aux = jax.jit(lambda p, b: make_loss(model, cfg)(p, b, None))(params, batch)
    dec_in = np.concatenate([np.full((3, 1), 10), batch["labels"][:, :-1]], axis=1)
    logits = jax.jit(lambda p, i, m, d: model.apply({"params": p}, i, m, d))(
        params, batch["input_ids"], batch["attention_mask"], dec_in)
    logp = jax.nn.log_softmax(logits, -1)
    manual = -np.mean(np.take_along_axis(np.asarray(logp), batch["labels"][..., None], -1))
    assert float(loss) == pytest.approx(manual, rel=1e-5)
    assert 0.0 <= float(aux["accuracy"]) <= 1.0


def test_blank_captions_are_deterministic_and_use_the_empty_prompt():
    src = {k: {"input_ids": np.full((200, 4), 7), "attention_mask": np.ones((200, 4), int),
               "labels": np.zeros((200, 3), int)} for k in range(3)}
    blank = {"input_ids": np.array([[0, 2, 1, 1]]), "attention_mask": np.array([[1, 1, 0, 0]])}
    a, b = BlankCaptions(src, 0.3, blank, seed=1), BlankCaptions(src, 0.3, blank, seed=1)
    rows = (a[2]["input_ids"] == blank["input_ids"][0]).all(axis=1)
    assert 0.2 < rows.mean() < 0.4
    np.testing.assert_array_equal(a[2]["input_ids"], b[2]["input_ids"])
    np.testing.assert_array_equal(a[2]["attention_mask"][rows], np.tile(blank["attention_mask"], (rows.sum(), 1)))
    assert not np.array_equal(a[1]["input_ids"], a[2]["input_ids"])
    assert (src[2]["input_ids"] == 7).all()  # the source is not modified
    with pytest.raises(ValueError, match="blank_caption_prob"):
        BlankCaptions(src, 1.5, blank)


def test_prefix_noise_puts_made_up_words_before_the_caption_and_keeps_the_rest(demo):
    """Chosen captioned rows: made-up words (letters only), then the caption's own tokens unchanged, then
    ``</s>``; blank rows, full rows and the source untouched; the same draw for the same (seed, batch)."""
    tok = DalleBartTokenizer.from_dir(demo / "dallebart", max_length=24, normalize=True)
    long = "a picture of a large blue star at the top on a green background"  # fills all 24 (truncated)
    captions = ["a red circle", "", "a large blue star at the top", long] * 30
    enc = tok(captions)
    lengths = enc["attention_mask"].sum(1)
    full, blank = lengths == 24, lengths == 2
    assert full.any() and blank.any()
    src = {k: {**{n: v.copy() for n, v in enc.items()}, "labels": np.zeros((120, 3), int)} for k in range(3)}
    a, b = PrefixNoise(src, 0.5, tok, seed=1), PrefixNoise(src, 0.5, tok, seed=1)
    out = a[2]
    np.testing.assert_array_equal(out["input_ids"], b[2]["input_ids"])
    assert not np.array_equal(out["input_ids"], a[1]["input_ids"])
    np.testing.assert_array_equal(src[2]["input_ids"], enc["input_ids"])  # the source is not modified
    new_lengths = out["attention_mask"].sum(1)
    changed = new_lengths > lengths
    assert not changed[blank | full].any()
    assert (out["input_ids"][blank | full] == enc["input_ids"][blank | full]).all()
    assert 0.3 < changed[~(blank | full)].mean() < 0.7
    for row in np.flatnonzero(changed):
        n, length = int(new_lengths[row] - lengths[row]), int(lengths[row])
        ids = out["input_ids"][row]
        assert ids[0] == tok.bos_token_id and ids[new_lengths[row] - 1] == tok.eos_token_id
        np.testing.assert_array_equal(ids[1 + n: length + n], enc["input_ids"][row, 1:length])
        assert (ids[new_lengths[row]:] == tok.pad_token_id).all()
        noise = tok.decode(ids[1: 1 + n]).split()
        assert noise and all(w.isalpha() and w.islower() for w in noise), noise
    everything = PrefixNoise(src, 1.0, tok, seed=0)[0]
    assert (everything["attention_mask"].sum(1) > lengths)[~(blank | full)].all()
    with pytest.raises(ValueError, match="prefix noise"):
        PrefixNoise(src, -0.1, tok)


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


def test_dallebart_resume_reaches_the_same_params(demo, tmp_path):
    kw = dict(steps=8, batch_size=8, save_every=3, log_every=2, progress=False,
              optim=OptimConfig(learning_rate=3e-3, warmup_steps=2))
    cfg = DalleBartConfig.from_json(demo / "dallebart")
    tok = demo / "dallebart"
    full = train_dallebart(tmp_path / "a", cfg, demo / "tokens", tok, **kw)
    part = train_dallebart(tmp_path / "b", cfg, demo / "tokens", tok, stop_after=5, **kw)
    assert part.result.interrupted and not (tmp_path / "b" / "flax_model.msgpack").exists()
    resumed = train_dallebart(tmp_path / "b", cfg, demo / "tokens", tok, **kw)
    assert resumed.result.resumed_from == 3
    for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "b-train" / "metrics.jsonl")] == [2, 4, 6, 8]


def test_dallebart_init_from_continues_an_exported_checkpoint(demo, tmp_path):
    """--init-from starts from the exported params (a fresh machine has no orbax state): one tiny-lr step
    stays next to them; a different config is refused in one line."""
    kw = dict(steps=1, batch_size=8, progress=False, optim=OptimConfig(learning_rate=1e-6, warmup_steps=0))
    cfg = DalleBartConfig.from_json(demo / "dallebart")
    saved = load_dallebart_params(demo / "dallebart", cfg)
    cont = train_dallebart(tmp_path / "c", cfg, demo / "tokens", demo / "dallebart", init_from=demo / "dallebart",
                           **kw)
    for x, y in zip(jax.tree.leaves(cont.params), jax.tree.leaves(saved), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)
    args = ["dallebart", "--shards", str(demo / "tokens"), "--out", str(tmp_path / "d"), "--init-from",
            str(demo / "dallebart"), "--d-model", "64", "--steps", "1", "--no-progress"]
    assert main(args) == 2
    del args[args.index("--d-model") : args.index("--d-model") + 2]  # no architecture flags: the saved config
    assert main([*args, "--batch-size", "4", "--prefix-noise", "0.3"]) == 0
    assert DalleBartConfig.from_json(tmp_path / "d") == cfg
    assert Checkpointer(tmp_path / "d-train" / "checkpoints").read_meta()["prefix_noise"] == 0.3


def test_dallebart_for_a_new_vqgan_keeps_the_text_and_transformer_weights(demo, tmp_path):
    """--new-image-vocab: a DalleBart for another VQGAN (more codes) starts from the old one's text encoder and
    transformer layers; the image embedding and output head are new; without the flag the mismatch is refused
    with a hint; any other difference is refused."""
    import dataclasses

    from training.train_dallebart import transfer_params

    old_cfg = DalleBartConfig.from_json(demo / "dallebart")
    codes = old_cfg.image_vocab_size + 16
    cfg = dataclasses.replace(old_cfg, image_vocab_size=codes, decoder_start_token_id=codes, bos_token_id=codes + 1,
                              eos_token_id=codes + 1, pad_token_id=codes + 1)
    old = load_dallebart_params(demo / "dallebart", old_cfg)
    new = transfer_params(demo / "dallebart", cfg, seed=1)
    flat_old = dict(jax.tree_util.tree_flatten_with_path(old)[0])
    fresh = {"['lm_head']['kernel']", "['model']['decoder']['embed_tokens']['embedding']"}
    for path, x in jax.tree_util.tree_flatten_with_path(new)[0]:
        key = jax.tree_util.keystr(path)
        if key in fresh:
            assert x.shape[-1 if "lm_head" in key else 0] == codes + 1
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_old[path]), err_msg=key)
    ids = jnp.zeros((1, 1), jnp.int32)
    logits = DalleBart(cfg).apply({"params": new}, ids, jnp.ones((1, 1), jnp.int32), ids)  # valid for the new config
    assert logits.shape[-1] == codes + 1

    kw = dict(steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="new_image_vocab"):
        train_dallebart(tmp_path / "x", cfg, demo / "tokens", demo / "dallebart", init_from=demo / "dallebart", **kw)
    out = train_dallebart(tmp_path / "t", cfg, demo / "tokens", demo / "dallebart", init_from=demo / "dallebart",
                          new_image_vocab=True, **kw)
    assert DalleBartConfig.from_json(tmp_path / "t") == cfg and out.result.losses
    with pytest.raises(ValueError, match="d_model"):
        transfer_params(demo / "dallebart", dataclasses.replace(cfg, d_model=cfg.d_model * 2))


def test_a_grown_dallebart_first_computes_what_the_saved_one_did_then_trains(demo, tmp_path):
    """--grow: more encoder and decoder layers, inserted as copies with zeroed residual gates, so the grown model's
    logits equal the saved model's exactly; the old layers keep their weights and order; one training step moves
    the gates off zero; fewer layers, or another difference, are refused."""
    import dataclasses

    from training.train_dallebart import grow_params

    old_cfg = DalleBartConfig.from_json(demo / "dallebart")
    m = old_cfg.decoder_layers
    cfg = dataclasses.replace(old_cfg, encoder_layers=old_cfg.encoder_layers + 1, decoder_layers=2 * m + 1)
    old, new = load_dallebart_params(demo / "dallebart", old_cfg), grow_params(demo / "dallebart", cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, old_cfg.encoder_vocab_size, (2, old_cfg.max_text_length)), jnp.int32)
    mask = jnp.asarray(np.arange(old_cfg.max_text_length) < np.array([[5], [9]]), jnp.int32)
    dec = jnp.asarray(rng.integers(0, old_cfg.image_vocab_size, (2, old_cfg.image_length)), jnp.int32)
    want = DalleBart(old_cfg).apply({"params": old}, ids, mask, dec)
    got = DalleBart(cfg).apply({"params": new}, ids, mask, dec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)

    def decoder(params, *path):
        node = params["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
        for key in path:
            node = node[key]
        return np.asarray(node)

    slots = [i * cfg.decoder_layers // m for i in range(m)]
    q = ("FlaxBartAttention_0", "q_proj", "kernel")
    np.testing.assert_array_equal(decoder(new, *q)[slots], decoder(old, *q))
    inserted = [j for j in range(cfg.decoder_layers) if j not in slots]
    gates = decoder(new, "GLU_0", "Dense_2", "kernel")
    assert not gates[inserted].any() and gates[slots].any()

    kw = dict(steps=1, batch_size=4, progress=False, optim=OptimConfig(learning_rate=1e-3, warmup_steps=0))
    with pytest.raises(ValueError, match="grow"):
        train_dallebart(tmp_path / "x", cfg, demo / "tokens", demo / "dallebart", init_from=demo / "dallebart", **kw)
    out = train_dallebart(tmp_path / "g", cfg, demo / "tokens", demo / "dallebart", init_from=demo / "dallebart",
                          grow=True, **kw)
    assert np.abs(decoder(out.params, "GLU_0", "Dense_2", "kernel")[inserted]).max() > 0  # the gates get gradients
    assert DalleBartConfig.from_json(tmp_path / "g") == cfg
    with pytest.raises(ValueError, match="cannot remove layers"):
        grow_params(tmp_path / "g", old_cfg)
    with pytest.raises(ValueError, match="d_model"):
        grow_params(demo / "dallebart", dataclasses.replace(cfg, d_model=cfg.d_model * 2))

    # the command line: --decoder-layers with --grow; the saved encoder depth is kept
    args = ["dallebart", "--shards", str(demo / "tokens"), "--out", str(tmp_path / "c"), "--init-from",
            str(demo / "dallebart"), "--decoder-layers", str(m + 1), "--grow", "--steps", "1", "--batch-size", "4",
            "--no-progress"]
    assert main(args) == 0
    grown = DalleBartConfig.from_json(tmp_path / "c")
    assert (grown.encoder_layers, grown.decoder_layers) == (old_cfg.encoder_layers, m + 1)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["encode", "--vqgan", str(tmp_path / "missing"), "--out", str(tmp_path / "t"),
                 "--num-images", "2", "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err


def test_encode_refuses_to_overwrite_shards(demo, tmp_path):
    with pytest.raises(FileExistsError):
        encode_shapes(demo / "vqgan", demo / "tokens", num_images=1, progress=False)


SHARDED_SCRIPT = """
import json, sys
import jax, numpy as np
from engine.config import DalleBartConfig
from engine.sharding import make_mesh
from training.encode import Encoder, load_vqgan
from training.optim import OptimConfig
from training.train_dallebart import train_dallebart
from training.data.shapes import ShapesConfig, ShapesDataset
assert jax.device_count() == 4
demo, out = sys.argv[1], sys.argv[2]
model, _, params = load_vqgan(demo + "/vqgan")
ds = ShapesDataset(0, ShapesConfig(image_size=32, factor=4))
images = np.stack([ds[i].image for i in range(10)])
codes = Encoder(model, params, mesh=make_mesh(), batch_size=6)(images)  # 6 -> 8 rows, last batch padded
cfg = DalleBartConfig.from_json(demo + "/dallebart")
mesh = make_mesh(model_parallel=2)
res = train_dallebart(out, cfg, demo + "/tokens", demo + "/dallebart", steps=4, batch_size=8, log_every=1,
                      optim=OptimConfig(learning_rate=3e-3), mesh=mesh, progress=False)
sharded = [str(x.sharding.spec) for x in jax.tree.leaves(res.result.state.params) if not x.sharding.is_fully_replicated]
print("RESULT" + json.dumps({"codes": codes.tolist(), "losses": res.result.losses, "sharded": sharded}))
"""


def test_encode_and_dallebart_sharded_over_4_devices_match_one_device(demo, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(demo), str(tmp_path / "sharded")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    model, _, params = load_vqgan(demo / "vqgan")
    from training.data.shapes import ShapesConfig, ShapesDataset
    from training.encode import Encoder

    ds = ShapesDataset(0, ShapesConfig(image_size=32, factor=4))
    images = np.stack([ds[i].image for i in range(10)])
    np.testing.assert_array_equal(np.asarray(out["codes"]), Encoder(model, params, batch_size=6)(images))
    assert out["sharded"], "no parameter was split over the model axis"
    cfg = DalleBartConfig.from_json(demo / "dallebart")
    ref = train_dallebart(tmp_path / "single", cfg, demo / "tokens", demo / "dallebart", steps=4, batch_size=8,
                          log_every=1, optim=OptimConfig(learning_rate=3e-3), progress=False)
    np.testing.assert_allclose(out["losses"], ref.result.losses, rtol=2e-5)


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


def test_clip_continues_an_exported_clip_on_vqgan_round_trips(demo, tmp_path):
    """``clip --init-from D --vqgan-roundtrip V``: starts from D's weights (a 1e-12 learning rate keeps them), and every
    image the loss sees is V's encode-decode round-trip of the render, which is what CLIP ranks at inference."""
    from training.data.shapes import ShapesConfig, ShapesDataset
    from training.train_clip import CaptionedImageBatches, make_loss, train_clip, vqgan_roundtrip
    from training.train_vqgan import reconstruct

    cfg = CLIPConfig.from_json(demo / "clip")
    saved = weights.load_params(demo / "clip", jax.eval_shape(
        lambda r: CLIPModel(cfg).init(r, *dummy_inputs(cfg))["params"], jax.random.PRNGKey(0)))
    shapes = ShapesConfig(image_size=32, factor=4)
    out = train_clip(tmp_path / "clip", cfg, demo / "clip", steps=3, batch_size=8, shapes=shapes,
                     optim=OptimConfig(name="adamw", learning_rate=1e-12, warmup_steps=1), init_from=demo / "clip",
                     vqgan_dir=demo / "vqgan", save_every=3, log_every=1, progress=False)
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(saved), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-8)
    assert json.loads((tmp_path / "clip" / "training.json").read_text())["steps"] == 3
    assert 0.0 <= out.eval_metrics["i2t_accuracy_hard"] <= 1.0

    # the round-trip is the VQGAN's reconstruction, and the loss is computed on it, not on the render
    roundtrip = vqgan_roundtrip(demo / "vqgan")
    tokenizer = CLIPTokenizer.from_dir(demo / "clip", max_length=cfg.text_config.max_position_embeddings)
    batch = CaptionedImageBatches(ShapesDataset(0, shapes), tokenizer, 8)[0]
    model, _, vq_params = load_vqgan(demo / "vqgan")
    _, expected = reconstruct(model, vq_params, batch["images"] / 255.0, 8, keep=True)
    got = np.asarray(jax.jit(roundtrip)(jnp.asarray(batch["images"])))
    assert np.max(np.abs(got * 255.0 - expected.astype(np.float32))) <= 0.5 + 1e-3
    inputs = {k: jnp.asarray(v) for k, v in batch.items()}
    plain = float(make_loss(CLIPModel(cfg), cfg)(saved, inputs, jax.random.PRNGKey(0))[0])
    on_recon = float(make_loss(CLIPModel(cfg), cfg, roundtrip)(saved, inputs, jax.random.PRNGKey(0))[0])
    with_recon_images = float(make_loss(CLIPModel(cfg), cfg)(saved, {**inputs, "images": jnp.asarray(got)},
                                                             jax.random.PRNGKey(0))[0])
    assert on_recon != plain and on_recon == pytest.approx(with_recon_images, rel=1e-5)


def test_clip_prefix_noise_keeps_the_pooled_end_token_and_the_images(demo, tmp_path):
    """``clip --prefix-noise P``: the CLIP's captions get made-up words after the start token; the caption's own
    tokens follow unchanged, CLIP's pooling position (the argmax id) moves onto the row's end token, and the
    images and same-caption keys are untouched. The run records P."""
    from training.data.shapes import ShapesConfig, ShapesDataset
    from training.train_clip import CaptionedImageBatches

    cfg = CLIPConfig.from_json(demo / "clip")
    tokenizer = CLIPTokenizer.from_dir(demo / "clip", max_length=cfg.text_config.max_position_embeddings)
    shapes = ShapesConfig(image_size=32, factor=4)
    plain = CaptionedImageBatches(ShapesDataset(0, shapes), tokenizer, 8, 0.5)
    before, after = plain[1], PrefixNoise(plain, 1.0, tokenizer, seed=0)[1]
    for name in ("images", "caption_key"):
        np.testing.assert_array_equal(after[name], before[name])
    lengths, new_lengths = before["attention_mask"].sum(1), after["attention_mask"].sum(1)
    assert (new_lengths > lengths).all()
    for row, (m, n) in enumerate(zip(lengths, new_lengths - lengths, strict=True)):
        ids = after["input_ids"][row]
        np.testing.assert_array_equal(ids[1 + n: m + n], before["input_ids"][row, 1:m])
        assert int(np.argmax(ids)) == m + n - 1 == int(np.argmax(before["input_ids"][row])) + n
        assert ids[m + n - 1] == tokenizer.eos_token_id
        assert (ids[1: 1 + n] < min(tokenizer.bos_token_id, tokenizer.eos_token_id)).all()  # no special token

    cli = ["clip", "--out", str(tmp_path / "c"), "--init-from", str(demo / "clip"), "--steps", "2",
           "--batch-size", "8", "--prefix-noise", "0.3", "--no-progress"]
    assert main(cli) == 0
    assert Checkpointer(tmp_path / "c-train" / "checkpoints").read_meta()["prefix_noise"] == 0.3


def test_clip_round_trip_refuses_images_of_another_size(demo, tmp_path, capsys):
    from training.train_clip import vqgan_roundtrip

    with pytest.raises(ValueError, match="images are 64x64, the VQGAN .* takes 32x32"):
        vqgan_roundtrip(demo / "vqgan")(jnp.zeros((1, 64, 64, 3), jnp.uint8))
    cfg = ["clip", "--out", str(tmp_path / "c"), "--init-from", str(demo / "clip"), "--steps", "1"]
    assert main([*cfg, "--vqgan-roundtrip", str(demo / "vqgan"), "--no-progress"]) == 2  # the data are 128 px
    assert "that VQGAN takes 32x32 images, the training images are 128x128" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
