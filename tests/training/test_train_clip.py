"""The CLIP trainer: the checkpoint loads, continues an exported CLIP on VQGAN round-trips, and prefix noise
keeps the pooled end token and the images."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import weights
from engine.config import CLIPConfig
from engine.models.clip import CLIPModel, dummy_inputs
from engine.text import CLIPTokenizer
from training.__main__ import main
from training.checkpoint import Checkpointer
from training.encode import load_vqgan
from training.optim import OptimConfig
from training.prefix_noise import PrefixNoise


def test_clip_checkpoint_loads(demo):
    d = demo / "clip"
    cfg = CLIPConfig.from_json(d)
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    shapes = jax.eval_shape(lambda r: CLIPModel(cfg).init(r, *dummy_inputs(cfg))["params"], jax.random.PRNGKey(0))
    params = weights.load_params(d, shapes)
    assert float(params["logit_scale"]) <= np.log(100.0) + 1e-6
    summary = json.loads((d / "training.json").read_text())
    assert 0.0 <= summary["eval"]["i2t_accuracy"] <= 1.0


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
