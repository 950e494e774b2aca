"""The preference fine-tune: KTO/DPO push liked sequences up and disliked ones down relative to the frozen
reference (gradient direction on a tiny random model), and a run on an exported feedback dataset writes a full
checkpoint, resumes, and leaves nothing that looks like a checkpoint when interrupted."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.config import DalleBartConfig
from engine.models.dallebart import DalleBart, init_params
from store.repository import DatasetSource, JudgedImage
from training.feedback import build_dataset, write_dataset
from training.preference import (
    PreferenceConfig,
    batched_logprobs,
    dpo_terms,
    finetune,
    kto_terms,
    make_preference_loss,
)

CFG = DalleBartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_vocab_size=20,
                      image_vocab_size=10, max_text_length=6, image_length=5, decoder_start_token_id=10)


def _batch(n: int = 8) -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    return {"input_ids": r.integers(0, 20, (n, 6)).astype(np.int32), "attention_mask": np.ones((n, 6), np.int32),
            "labels": r.integers(0, 10, (n, 5)).astype(np.int32),
            "desirable": np.asarray([1, 0] * (n // 2), np.float32), "weight": np.ones(n, np.float32)}


@pytest.mark.parametrize("sft", [0.0, 0.5])
def test_kto_steps_make_liked_sequences_likelier_than_the_reference(sft):
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(1))
    batch = _batch()
    ref = batched_logprobs(CFG, params, batch["input_ids"], batch["attention_mask"], batch["labels"], 8)
    batch["ref_logp"] = ref
    loss_fn = make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(beta=0.1, sft_weight=sft),
                                   with_pairs=False)
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))
    p = params
    for _ in range(5):
        p = jax.tree.map(lambda w, g: w - 0.5 * g, p, grad(p))
    new = batched_logprobs(CFG, p, batch["input_ids"], batch["attention_mask"], batch["labels"], 8)
    r = new - ref
    des = batch["desirable"] == 1
    assert r[des].mean() > 0 > r[~des].mean()
    assert r[des].min() > r[~des].max()
    _, aux = loss_fn(p, batch, None)
    assert float(aux["reward_margin"]) == pytest.approx(r[des].mean() - r[~des].mean(), rel=1e-3)
    assert float(aux["kl_ref"]) == pytest.approx(float(np.mean(ref - new)), rel=1e-3, abs=1e-4)


def test_loss_terms():
    cfg = PreferenceConfig(beta=0.1)
    # at the reference the KTO loss is 0.5 per example, and a desirable example above the reference costs less
    zero = jnp.zeros(2)
    loss, aux = kto_terms(zero, zero, jnp.asarray([1.0, 0.0]), jnp.ones(2), cfg)
    assert float(loss) == pytest.approx(0.5) and float(aux["reward_margin"]) == 0.0
    better, _ = kto_terms(jnp.asarray([5.0, -5.0]), zero, jnp.asarray([1.0, 0.0]), jnp.ones(2), cfg)
    assert float(better) < 0.5
    worse, _ = kto_terms(jnp.asarray([-5.0, 5.0]), zero, jnp.asarray([1.0, 0.0]), jnp.ones(2), cfg)
    assert float(worse) > 0.5
    dpo, daux = dpo_terms(jnp.asarray([2.0]), jnp.asarray([0.0]), jnp.asarray([-2.0]), jnp.asarray([0.0]),
                          jnp.ones(1), cfg)
    assert float(dpo) == pytest.approx(-np.log(1 / (1 + np.exp(-0.4))), rel=1e-5)
    assert float(daux["dpo_accuracy"]) == 1.0
    with pytest.raises(ValueError, match="beta"):
        PreferenceConfig(beta=0).validate()


def test_kto_at_a_zero_reference_keeps_pushing_a_disliked_image_while_liked_ones_rise():
    """With the batch's mean reward as reference, liked images far above the parent lift z and a disliked image's
    term saturates (almost no gradient); at a zero reference it still pulls the disliked image down."""
    des = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    ref = jnp.zeros(4)

    def grad_on_disliked(reference: str) -> float:
        cfg = PreferenceConfig(beta=0.1, kto_reference=reference)
        g = jax.grad(lambda lp: kto_terms(lp, ref, des, jnp.ones(4), cfg)[0])(jnp.asarray([60.0, 60.0, 60.0, -5.0]))
        return float(g[3])

    batch, zero = grad_on_disliked("batch"), grad_on_disliked("zero")
    assert 0 < batch < 1e-3  # z = 43.75: the disliked term is saturated
    assert zero > 20 * batch  # descending the loss lowers the disliked image's log-prob
    _, aux = kto_terms(jnp.asarray([60.0, 60.0, 60.0, -5.0]), ref, des, jnp.ones(4),
                       PreferenceConfig(kto_reference="zero"))
    assert float(aux["kto_z"]) == 0.0
    with pytest.raises(ValueError, match="kto_reference"):
        PreferenceConfig(kto_reference="mean").validate()


def test_the_objective_reads_the_model_at_its_temperature():
    """At temperature T the summed log-prob is that of softmax(logits / T), in the loss and for the reference."""
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(2))
    b = _batch()
    dec_in = np.concatenate([np.full((8, 1), CFG.decoder_start_token_id, np.int32), b["labels"][:, :-1]], axis=1)
    logits = np.asarray(DalleBart(CFG).apply({"params": params}, b["input_ids"], b["attention_mask"], dec_in),
                        np.float64)
    for t in (1.0, 0.5):
        lp = jax.nn.log_softmax(jnp.asarray(logits / t), axis=-1)
        want = np.take_along_axis(np.asarray(lp), b["labels"][..., None], -1)[..., 0].sum(-1)
        got = batched_logprobs(CFG, params, b["input_ids"], b["attention_mask"], b["labels"], 8, temperature=t)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the loss's rewards read it there too: at the reference (ref_logp computed at T) every reward is 0
    cfg = PreferenceConfig(temperature=0.5)
    b["ref_logp"] = batched_logprobs(CFG, params, b["input_ids"], b["attention_mask"], b["labels"], 8,
                                     temperature=0.5)
    _, aux = make_preference_loss(DalleBart(CFG), CFG, cfg, with_pairs=False)(params, b, None)
    assert abs(float(aux["kl_ref"])) < 1e-4 and abs(float(aux["reward_margin"])) < 1e-4
    with pytest.raises(ValueError, match="temperature"):
        PreferenceConfig(temperature=0.0).validate()


def test_the_objective_reads_the_model_as_the_sampler_guides_it():
    """At guidance s the summed log-prob is that of softmax((u + s·(c − u)) / T), u the model on the empty prompt,
    in the loss and for the reference; and a step on a disliked image moves the unconditional branch too."""
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(4))
    b = _batch()
    empty = (np.asarray([[1, 2, 0, 0, 0, 0]], np.int32), np.asarray([[1, 1, 0, 0, 0, 0]], np.int32))
    dec_in = np.concatenate([np.full((8, 1), CFG.decoder_start_token_id, np.int32), b["labels"][:, :-1]], axis=1)
    model = DalleBart(CFG)
    cond = np.asarray(model.apply({"params": params}, b["input_ids"], b["attention_mask"], dec_in), np.float64)
    uncond = np.asarray(model.apply({"params": params}, np.repeat(empty[0], 8, 0), np.repeat(empty[1], 8, 0),
                                    dec_in), np.float64)
    s, t = 2.0, 0.7
    lp = jax.nn.log_softmax(jnp.asarray((uncond + s * (cond - uncond)) / t), axis=-1)
    want = np.take_along_axis(np.asarray(lp), b["labels"][..., None], -1)[..., 0].sum(-1)
    got = batched_logprobs(CFG, params, b["input_ids"], b["attention_mask"], b["labels"], 8, temperature=t,
                           guidance=s, uncond=empty)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    plain = batched_logprobs(CFG, params, b["input_ids"], b["attention_mask"], b["labels"], 8, temperature=t)
    assert np.abs(got - plain).max() > 1e-3  # the guided reading is not the conditional one
    cfg = PreferenceConfig(temperature=t, guidance=s)
    b["ref_logp"] = got
    loss_fn = make_preference_loss(model, CFG, cfg, with_pairs=False, uncond=empty)
    _, aux = loss_fn(params, b, None)
    assert abs(float(aux["kl_ref"])) < 1e-4 and abs(float(aux["reward_margin"])) < 1e-4
    # the unconditional branch shares the credit: its logits on the empty prompt change after one step
    grad = jax.grad(lambda p: loss_fn(p, b, None)[0])(params)
    stepped = jax.tree.map(lambda w, g: w - 0.5 * g, params, grad)
    moved = np.asarray(model.apply({"params": stepped}, np.repeat(empty[0], 8, 0), np.repeat(empty[1], 8, 0),
                                   dec_in))
    assert np.abs(moved - uncond).max() > 1e-4
    with pytest.raises(ValueError, match="empty prompt"):
        make_preference_loss(model, CFG, cfg, with_pairs=False)
    with pytest.raises(ValueError, match="empty prompt"):
        batched_logprobs(CFG, params, b["input_ids"], b["attention_mask"], b["labels"], 8, guidance=s)
    with pytest.raises(ValueError, match="guidance"):
        PreferenceConfig(guidance=0.0).validate()


def _export(demo, out) -> None:
    """A feedback export for the tiny demo model: each prompt has a liked and a disliked image."""
    cfg = DalleBartConfig.from_json(demo / "dallebart")
    r = np.random.default_rng(3)
    images = []
    for i in range(12):
        for j, (up, down) in enumerate(((1, 0), (0, 1))):
            images.append(JudgedImage(image_id=2 * i + j, generation_id=i, author_id=1, prompt=f"a circle {i}",
                                      normalized_prompt=f"a circle {i}",
                                      tokens=r.integers(0, cfg.image_vocab_size, cfg.image_length).astype(np.int16),
                                      checkpoint_id="tiny", clip_score=None, up=up, down=down, report_reasons=(),
                                      decisions=(), created_at=datetime.now(UTC)))
    write_dataset(build_dataset(DatasetSource(images, 0, 0), holdout=0.0), out, source="test")


def test_finetune_writes_a_checkpoint_and_an_interrupted_run_writes_none(demo, tmp_path):
    _export(demo, tmp_path / "data")
    out = tmp_path / "ft"
    part = finetune(demo, tmp_path / "data", out, steps=6, batch_size=8, lr=1e-3, stop_after=3, save_every=3,
                    progress=False)
    assert part.interrupted and not out.exists() and not (tmp_path / "ft.partial").exists()
    done = finetune(demo, tmp_path / "data", out, steps=6, batch_size=8, lr=1e-3, save_every=3, progress=False,
                    checkpoint_id="ft-1")
    assert not done.interrupted and done.steps == 6
    assert done.history[0]["step"] > 3  # resumed, not restarted
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["id"] == "ft-1" and meta["finetune"]["pairs"] == 12
    for name in ("dallebart/flax_model.msgpack", "dallebart/tokenizer.json", "vqgan/flax_model.msgpack",
                 "clip/flax_model.msgpack"):
        assert (out / name).is_file(), name
    logged = [json.loads(line) for line in (tmp_path / "ft-train" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert {"kto_loss", "dpo_loss", "reward_margin", "kl_ref"} <= keys
    with pytest.raises(FileExistsError):
        finetune(demo, tmp_path / "data", out, steps=6, batch_size=8)


def test_trainable_encoder_freezes_the_decoder_and_still_moves_the_rewards_the_right_way():
    from training.loop import train
    from training.optim import OptimConfig, param_path
    from training.preference import TRAINABLE

    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(1))
    batch = _batch()
    batch["ref_logp"] = batched_logprobs(CFG, params, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         8)
    loss_fn = make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(beta=0.1), with_pairs=False)
    optim = OptimConfig(learning_rate=3e-2, max_grad_norm=1.0, trainable=TRAINABLE["encoder"])
    result = train(jax.tree.map(jnp.array, params), loss_fn, lambda k: batch, steps=8, optim=optim,
                   progress=False)
    before = dict((param_path(k), np.asarray(v)) for k, v in jax.tree_util.tree_leaves_with_path(params))
    after = dict((param_path(k), np.asarray(v)) for k, v in jax.tree_util.tree_leaves_with_path(result.params))
    encoder = [k for k in before if k.startswith("model/encoder/")]
    frozen = [k for k in before if not k.startswith("model/encoder/")]
    assert encoder and frozen and any(k.startswith("model/decoder/") for k in frozen)
    for k in frozen:  # bit for bit the parent's
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert all(not np.array_equal(after[k], before[k]) for k in encoder if "embed_tokens" not in k)
    assert not np.array_equal(after["model/encoder/embed_tokens/embedding"],
                              before["model/encoder/embed_tokens/embedding"])
    new = batched_logprobs(CFG, result.params, batch["input_ids"], batch["attention_mask"], batch["labels"], 8)
    r = new - batch["ref_logp"]
    des = batch["desirable"] == 1
    assert r[des].mean() > 0 > r[~des].mean()


def test_trainable_presets_match_the_demo_models_parameters(demo):
    from engine.models.layout import load_dallebart_params
    from training.optim import trainable_mask
    from training.preference import TRAINABLE

    config = DalleBartConfig.from_json(demo / "dallebart")
    params = load_dallebart_params(demo / "dallebart", config, dtype="float32")
    total = sum(x.size for x in jax.tree.leaves(params))
    counts = {name: sum(x.size for x, on in zip(jax.tree.leaves(params),
                                                jax.tree.leaves(trainable_mask(params, pats)), strict=True) if on)
              for name, pats in TRAINABLE.items()}
    assert counts["all"] == total
    assert 0 < counts["encoder-embed"] < counts["encoder"] < counts["encoder+cross"] < total
    assert counts["encoder+cross"] == counts["encoder"] + counts["cross"]
    with pytest.raises(ValueError, match="trainable"):
        finetune(demo, demo, demo.parent / "never", trainable="decoder-only")


def test_token_kl_is_zero_at_the_parent_and_holds_the_model_near_it():
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(1))
    batch = _batch()
    batch["ref_logp"] = batched_logprobs(CFG, params, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         8)
    with pytest.raises(ValueError, match="ref_params"):
        make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(token_kl_weight=1.0), with_pairs=False)

    def run(weight: float):
        loss_fn = make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(beta=0.1, token_kl_weight=weight),
                                       with_pairs=False, ref_params=params)
        grad = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))
        p = params
        for _ in range(5):
            p = jax.tree.map(lambda w, g: w - 0.5 * g, p, grad(p))
        return p

    probe = make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(token_kl_weight=1.0), with_pairs=False,
                                 ref_params=params)
    assert float(probe(params, batch, None)[1]["token_kl"]) == pytest.approx(0.0, abs=1e-5)
    kls = {}
    for weight in (0.0, 0.2):
        p = run(weight)
        kls[weight] = float(probe(p, batch, None)[1]["token_kl"])
        r = batched_logprobs(CFG, p, batch["input_ids"], batch["attention_mask"], batch["labels"], 8) \
            - batch["ref_logp"]
        des = batch["desirable"] == 1
        assert r[des].mean() > r[~des].mean() and r[~des].mean() < 0  # the preference still moves the right way
    assert 0 < kls[0.2] < kls[0.0]


def test_uncontested_token_kl_anchors_only_prompts_nobody_disliked():
    """token_kl_scope="uncontested": the KL is measured on the rows marked uncontested only, so a model moved away
    from the parent on contested rows pays nothing for it, and the scope is validated."""
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(1))
    moved = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(2))
    batch = _batch()
    batch["ref_logp"] = batched_logprobs(CFG, params, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         8)

    def token_kl(scope: str, uncontested: np.ndarray) -> float:
        fn = make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(token_kl_weight=1.0, token_kl_scope=scope),
                                  with_pairs=False, ref_params=params)
        return float(fn(moved, {**batch, "uncontested": uncontested}, None)[1]["token_kl"])

    everywhere = token_kl("all", np.zeros(8, np.float32))
    assert everywhere > 0
    assert token_kl("uncontested", np.zeros(8, np.float32)) == 0.0
    assert token_kl("uncontested", np.ones(8, np.float32)) == pytest.approx(everywhere, rel=1e-5)
    half = np.asarray([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
    assert 0 < token_kl("uncontested", half) != pytest.approx(everywhere)
    with pytest.raises(ValueError, match="token_kl_scope"):
        PreferenceConfig(token_kl_scope="liked").validate()


def test_the_loaded_data_marks_prompts_with_a_dislike_as_contested(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.preference import load_preference_data

    rows = [{"example_id": str(i), "prompt": p, "normalized_prompt": p.lower(), "tokens": [1, 2, 3, 4, 5],
             "desirable": d, "weight": 1.0, "split": "train", "down_reasons": ["bias", ""] if not d else [],
             "report_reasons": ["nsfw"] if i == 3 else []}
            for i, (p, d) in enumerate([("A circle", True), ("a circle", False), ("a star", True), ("a star", True)])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "unpaired.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string()), ("split", pa.string())])),
                   tmp_path / "pairs.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"unpaired": "unpaired.parquet",
                                                                  "pairs": "pairs.parquet"}}))

    class Tok:
        def __call__(self, texts):
            return {"input_ids": np.zeros((len(texts), 6), np.int32),
                    "attention_mask": np.ones((len(texts), 6), np.int32)}

    data = load_preference_data(tmp_path, Tok(), 5)
    assert data.unpaired["uncontested"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert data.prompts == ["A circle", "a circle", "a star", "a star"]
    assert data.reasons == [[], ["bias"], [], ["nsfw"]]  # what the counterfactual pairs look for
