"""The DalleBart trainer: the checkpoint loads with its tokenizer, next-token loss, caption blanking and
prefix noise, exact resume, continuing (--init-from), a new image vocabulary, growing layers, and
sharded encode and training that match one device."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import DalleBartConfig
from engine.models.dallebart import DalleBart, init_params
from engine.models.layout import load_dallebart_params
from engine.text import DalleBartTokenizer
from training.__main__ import main
from training.checkpoint import Checkpointer
from training.encode import load_vqgan
from training.metrics_log import read_metrics
from training.optim import OptimConfig
from training.prefix_noise import PrefixNoise
from training.train_dallebart import BlankCaptions, make_loss, train_dallebart


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
