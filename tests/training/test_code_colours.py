"""The colour-spared token KL: the codes' colours read from the VQGAN, and a KL that is the whole KL less the term
for which colour the object takes (so a model that only re-colours pays nothing, one that draws no object does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.models.dallebart import DalleBart, init_params
from tests.training.test_preference import CFG, _batch
from training.code_colours import class_matrix, code_colour_classes, colour_spared_kl, deciding_positions
from training.data import COLOURS
from training.preference import PreferenceConfig, batched_logprobs, make_preference_loss, reward_mask

DEMO_VQGAN = "engine/assets/demo/vqgan"
#: codes 0-1 white, 2-4 red, 5-7 blue, 8-9 green; token 10 (the start token) paints nothing
CLASSES = np.asarray([0, 0, 1, 1, 1, 2, 2, 2, 3, 3], np.int32)


def _kls(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    full, spared = colour_spared_kl(jnp.log(jnp.asarray(p))[None, None], jnp.log(jnp.asarray(q))[None, None],
                                    jnp.asarray(class_matrix(CLASSES, 11, 4)), jnp.asarray([0]))  # on white
    return float(full[0]), float(spared[0])


def test_recolouring_the_object_costs_nothing_and_everything_else_costs_what_it_did():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(11))
    onehot = class_matrix(CLASSES, 11, 4)
    mass = p @ onehot  # per class
    # the same object mass and the same code within each colour, the colours' shares changed to 0.8 / 0.1 / 0.1
    obj = mass[1:].sum()
    shares = np.asarray([0.8, 0.1, 0.1]) * obj
    scale = np.ones(4)
    scale[1:] = shares / mass[1:]
    recoloured = p * (onehot @ scale + (onehot.sum(1) == 0))  # the start token keeps its probability
    full, spared = _kls(p, recoloured)
    assert full > 0.05 and spared == pytest.approx(0.0, abs=1e-5)
    # less object, more background (the cheap way to draw nothing): the spared KL sees it
    is_obj = np.r_[CLASSES > 0, False]
    blank = p.copy()
    blank[is_obj] *= 0.3
    blank[~is_obj] *= (1 - blank[is_obj].sum()) / blank[~is_obj].sum()
    full, spared = _kls(p, blank)
    assert spared > 0.05 and spared <= full + 1e-6
    # another code within the same colour (another outline): seen too
    outline = p.copy()
    outline[2], outline[3] = outline[3], outline[2]
    full, spared = _kls(p, outline)
    assert spared == pytest.approx(full, rel=1e-4) and spared > 0


def test_the_colour_spared_scope_spares_only_the_prompts_someone_disliked():
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(1))
    moved = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(2))
    batch = _batch()
    batch["ref_logp"] = batched_logprobs(CFG, params, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         8)
    classes = class_matrix(CLASSES, CFG.image_vocab_size + 1, 4)

    def token_kl(scope: str, uncontested: np.ndarray) -> float:
        fn = make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(token_kl_weight=1.0, token_kl_scope=scope),
                                  with_pairs=False, ref_params=params, code_classes=classes)
        return float(fn(moved, {**batch, "uncontested": uncontested}, None)[1]["token_kl"])

    everywhere = token_kl("all", np.zeros(8, np.float32))
    assert token_kl("colour-spared", np.ones(8, np.float32)) == pytest.approx(everywhere, rel=1e-5)
    spared = token_kl("colour-spared", np.zeros(8, np.float32))
    assert 0 < spared < everywhere
    with pytest.raises(ValueError, match="code_classes"):
        make_preference_loss(DalleBart(CFG), CFG, PreferenceConfig(token_kl_weight=1.0,
                             token_kl_scope="colour-spared"), with_pairs=False, ref_params=params)


def test_the_demo_vqgans_codes_for_a_flat_colour_are_read_as_that_colour():
    from training.encode import Encoder, load_vqgan

    classes, names = code_colour_classes(DEMO_VQGAN, COLOURS, n_images=256)
    assert names == tuple(COLOURS)
    assert all(np.sum(classes == k) > 50 for k in range(len(names)))  # every colour has codes
    model, config, params = load_vqgan(DEMO_VQGAN)
    flat = np.stack([np.broadcast_to(np.asarray(COLOURS[n], np.uint8), (config.resolution, config.resolution, 3))
                     for n in names])
    codes = np.asarray(Encoder(model, params)(flat))
    for k, name in enumerate(names):
        read = np.bincount(classes[codes[k]], minlength=len(names))
        assert read.argmax() == k, (name, dict(zip(names, read.tolist(), strict=True)))


def test_the_colour_is_free_only_where_it_is_decided():
    classes = jnp.asarray(class_matrix(CLASSES, 11, 4))
    labels = jnp.asarray([[0, 1, 0, 3, 4, 0, 2, 2, 1, 0],   # on white, the first red code at position 3
                          [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],   # nothing but background
                          [5, 6, 5, 5, 7, 5, 0, 1, 1, 5]])  # on blue, the first white code at position 6
    free, background = deciding_positions(labels, classes, window=2)
    free = np.asarray(free)
    assert np.asarray(background).tolist() == [0, 0, 2]
    assert free[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0] and free[1].tolist() == [0] * 10
    assert free[2].tolist() == [0] * 6 + [1, 1, 1, 0]
    # past the decision the whole KL holds: re-colouring there costs what it did
    rng = np.random.default_rng(1)
    p = jnp.log(jnp.asarray(rng.dirichlet(np.ones(11), size=(1, 10)), jnp.float32))
    q = jnp.log(jnp.asarray(rng.dirichlet(np.ones(11), size=(1, 10)), jnp.float32))
    full, everywhere = colour_spared_kl(p, q, classes, background[:1])
    _, at_decision = colour_spared_kl(p, q, classes, background[:1], jnp.asarray(free[:1]))
    assert float(everywhere[0]) < float(at_decision[0]) < float(full[0])


def test_a_colour_deciding_reward_scores_only_the_positions_where_the_colour_is_chosen():
    """reward_scope="colour-deciding": KTO's log-prob is the object's first code's only, so a 👎 moves the
    parent's choice there and nothing else; the scope is validated and needs the codes' colours."""
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(1))
    classes = class_matrix(CLASSES, CFG.image_vocab_size + 1, 4)
    batch = _batch()
    # every row on white, its object's first code at position 1 (the only position scored): blue in the liked
    # rows, red in the disliked ones
    liked, disliked = [0, 5, 6, 9, 6], [0, 2, 3, 9, 6]
    batch["labels"] = np.asarray([liked if d else disliked for d in batch["desirable"]], np.int32)
    free = np.asarray(reward_mask(jnp.asarray(batch["labels"]), jnp.asarray(classes), "colour-deciding"))
    assert free.tolist() == [[0, 1, 0, 0, 0]] * 8
    whole = batched_logprobs(CFG, params, batch["input_ids"], batch["attention_mask"], batch["labels"], 8)
    part = batched_logprobs(CFG, params, batch["input_ids"], batch["attention_mask"], batch["labels"], 8, free)
    assert np.all(part > whole)  # one position fewer of negative log-probs
    batch["ref_logp"] = part
    cfg = PreferenceConfig(beta=1.0, reward_scope="colour-deciding")
    loss_fn = make_preference_loss(DalleBart(CFG), CFG, cfg, with_pairs=False, code_classes=classes)
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))
    p = params
    for _ in range(5):
        p = jax.tree.map(lambda w, g: w - 0.5 * g, p, grad(p))
    new = batched_logprobs(CFG, p, batch["input_ids"], batch["attention_mask"], batch["labels"], 8, free)
    des = batch["desirable"] == 1
    assert (new - part)[des].mean() > 0 > (new - part)[~des].mean()
    with pytest.raises(ValueError, match="reward_scope"):
        PreferenceConfig(reward_scope="colour").validate()
    with pytest.raises(ValueError, match="code_classes"):
        make_preference_loss(DalleBart(CFG), CFG, cfg, with_pairs=False)
