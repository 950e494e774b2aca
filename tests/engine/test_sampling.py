"""Sampling engine: logit processing, reproducibility across batching, cache correctness, hooks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.models.dallebart import DalleBart
from engine.models.layout import scan_params, unscan_params
from engine.sampling import (
    FAST_TOP_K,
    Sampler,
    bucket_for,
    candidate_keys,
    distinct_texts,
    process_logits,
    sample_tokens,
    split_seeds,
    text_sizes,
)
from tests.fakes.dallebart import random_params, tiny_config

CFG = tiny_config()  # image_length 16, 60 valid codes of 64 (+1 start row)
T = CFG.max_text_length


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=7, std=0.1)


@pytest.fixture(scope="module")
def sampler(params):
    return Sampler(None, params, CFG, jnp.float32, buckets=(1, 4))


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.ones((n, T), np.int32)
    mask = np.zeros((n, T), np.int32)
    for i in range(n):
        length = int(rng.integers(3, T))
        ids[i, :length] = rng.integers(3, CFG.encoder_vocab_size, size=length)
        mask[i, :length] = 1
    uids = np.ones((n, T), np.int32)
    uids[:, :2] = [0, 2]
    umask = np.zeros((n, T), np.int32)
    umask[:, :2] = 1
    return ids, mask, uids, umask


# ----------------------------------------------------------------------------------------------
# process_logits on crafted logits
# ----------------------------------------------------------------------------------------------


def _pl(cond, uncond=None, scale=1.0, temperature=1.0, top_k=0, top_p=1.0):
    cond = jnp.asarray(cond, jnp.float32)
    b = cond.shape[0]
    uncond = cond if uncond is None else jnp.asarray(uncond, jnp.float32)
    full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (b,))  # noqa: E731
    return process_logits(
        cond, uncond, full(scale, jnp.float32), full(temperature, jnp.float32), full(top_k, jnp.int32),
        full(top_p, jnp.float32),
    )


def test_superconditioning_and_temperature_formula():
    rng = np.random.default_rng(0)
    c, u = rng.standard_normal((2, 3, 20)).astype(np.float32)
    out = _pl(c, u, scale=[10.0, 1.0, 0.0], temperature=[1.0, 2.0, 0.5])
    want = np.stack([(u[0] + 10 * (c[0] - u[0])), c[1] / 2.0, u[2] / 0.5])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    assert out.dtype == jnp.float32
    # bf16 inputs are combined in float32
    assert _pl(jnp.asarray(c, jnp.bfloat16), jnp.asarray(u, jnp.bfloat16)).dtype == jnp.float32


def test_top_k_per_row():
    x = np.array([[0.0, 5.0, 1.0, 3.0, 2.0, 4.0]] * 3, np.float32)
    out = np.asarray(_pl(x, top_k=[1, 3, 0]))
    assert np.isfinite(out[0]).tolist() == [False, True, False, False, False, False]
    assert np.isfinite(out[1]).tolist() == [False, True, False, True, False, True]
    assert np.isfinite(out[2]).all()
    np.testing.assert_allclose(out[1][np.isfinite(out[1])], [5.0, 3.0, 4.0])


def test_top_p_nucleus():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)
    x = np.log(probs)[None].repeat(4, 0)
    out = np.asarray(_pl(x, top_p=[0.5, 0.6, 0.86, 1.0]))
    assert np.isfinite(out).sum(axis=1).tolist() == [1, 2, 4, 5]
    # top-k is applied before top-p: nucleus of the renormalised top-2 {0.5/0.7, 0.2/0.7}
    out = np.asarray(_pl(x[:1], top_k=2, top_p=0.75))
    assert np.isfinite(out).sum() == 2


def test_fast_top_k_path_equals_full_sort_path():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 1000)).astype(np.float32)
    ks, ps = [50, 1, FAST_TOP_K, 0], [1.0, 1.0, 0.3, 1.0]
    fast = np.asarray(_pl(x, top_k=ks, top_p=ps))  # every row fits the lax.top_k path
    # the same rows next to one that needs a full sort (top-k off, top-p on) take the sort path
    slow = np.asarray(_pl(np.concatenate([x, x[:1]]), top_k=ks + [0], top_p=ps + [0.9]))
    np.testing.assert_array_equal(fast, slow[:4])
    assert np.isfinite(fast).sum(axis=1).tolist()[:2] == [50, 1] and np.isfinite(fast[3]).all()
    big = np.asarray(_pl(x[:1], top_k=FAST_TOP_K + 44))
    assert np.isfinite(big).sum() == FAST_TOP_K + 44


def test_sampling_draws_only_from_nucleus_and_low_temperature_is_argmax():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 50)).astype(np.float32) * 2
    p = np.exp(x[0] - x[0].max())
    p /= p.sum()
    order = np.argsort(-p)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.5) + 1)].tolist())
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, lg: jax.random.categorical(k, lg[0]), in_axes=(0, None)))
    drawn = set(np.asarray(draw(keys, _pl(x, top_p=0.5))).tolist())
    assert drawn == nucleus  # every nucleus member shows up in 4000 draws, nothing else
    cold = np.asarray(draw(keys[:500], _pl(x, temperature=0.01)))
    assert (cold == int(np.argmax(x))).all()
    warm = np.asarray(draw(keys[:500], _pl(x)))
    assert len(set(warm.tolist())) > 5


def _draws(x, top_k, top_p, n_keys=3000, seed=0):
    """(n_keys, B) tokens of sample_tokens on logits x (B,V) with per-row top_k/top_p, one key per draw and row."""
    b = x.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed), n_keys * b).reshape(n_keys, b, 2)
    one = jnp.ones((b,), jnp.float32)
    fn = jax.jit(jax.vmap(lambda k: sample_tokens(k, x, x, one, one, jnp.asarray(top_k, jnp.int32),
                                                  jnp.asarray(top_p, jnp.float32))))
    return np.asarray(fn(keys))


def test_sample_tokens_draws_from_the_kept_set_with_softmax_frequencies():
    """Rank draws (top-k in each width class, with and without top-p) and the full-V draw (top-k off) keep exactly
    the filtered set and follow its renormalised softmax."""
    rng = np.random.default_rng(5)
    v = 1000
    x = np.repeat((rng.standard_normal((1, v)) * 3).astype(np.float32), 5, axis=0)
    top_k, top_p = [5, 40, 200, 0, 12], [1.0, 1.0, 1.0, 0.3, 0.6]
    drawn = _draws(jnp.asarray(x), top_k, top_p, n_keys=4000)
    kept = np.isfinite(np.asarray(_pl(x, top_k=top_k, top_p=top_p)))
    for row in range(5):
        got = np.bincount(drawn[:, row], minlength=v)
        assert set(np.nonzero(got)[0]) <= set(np.nonzero(kept[row])[0]), row
        p = np.exp(x[row] - x[row].max()) * kept[row]
        p /= p.sum()
        top = np.argsort(-p)[:3]  # the likeliest tokens: frequency within 4 standard errors
        se = np.sqrt(p[top] * (1 - p[top]) / len(drawn))
        assert np.all(np.abs(got[top] / len(drawn) - p[top]) < 4 * se + 1e-3), (row, got[top], p[top])


def test_sample_tokens_of_a_row_do_not_depend_on_the_other_rows():
    """Same key, logits and parameters ⇒ same token, whatever the other rows of the batch use (another lax.top_k
    width, the full-V pass with or without top-p, argmax)."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 300)).astype(np.float32) * 2)
    keys = jax.random.split(jax.random.PRNGKey(9), 200)
    one, two = jnp.ones((1,), jnp.float32), jnp.ones((2,), jnp.float32)
    solo = jax.vmap(lambda k: sample_tokens(k[None], x, x, one, one, jnp.asarray([16]), one))(keys)[:, 0]
    assert len(set(np.asarray(solo).tolist())) > 3  # really sampled
    x2 = jnp.concatenate([x, x])
    for other_k, other_p in ((200, 1.0), (0, 1.0), (0, 0.5), (1, 1.0)):
        pair = jax.vmap(lambda k, ok=other_k, op=other_p: sample_tokens(
            jnp.stack([k, k]), x2, x2, two, two, jnp.asarray([16, ok]), jnp.asarray([1.0, op])))(keys)
        np.testing.assert_array_equal(np.asarray(pair[:, 0]), np.asarray(solo), err_msg=str((other_k, other_p)))


def test_sample_tokens_top_k_one_is_argmax():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((3, 500)).astype(np.float32))
    drawn = _draws(x, [1, 1, 1], [1.0, 1.0, 1.0], n_keys=50)
    assert (drawn == np.argmax(np.asarray(x), axis=-1)[None]).all()


# ----------------------------------------------------------------------------------------------
# keys, buckets, validation
# ----------------------------------------------------------------------------------------------


def test_candidate_keys_depend_on_seed_and_index_only():
    hi, lo = split_seeds([123, 123, 2**63 - 1])
    keys = jax.random.key_data(candidate_keys(jnp.asarray(hi), jnp.asarray(lo), jnp.asarray([4, 5, 4], jnp.uint32)))
    want = jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(123), 4))
    np.testing.assert_array_equal(keys[0], want)
    assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[0], keys[2])


def test_bucket_for():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 10, 32)] == [1, 2, 4, 8, 8, 9, 16, 32]
    assert bucket_for(5, (8, 2)) == 8  # any order
    with pytest.raises(ValueError, match="largest batch bucket"):
        bucket_for(33)
    with pytest.raises(ValueError):
        bucket_for(0)


def test_distinct_texts_are_encoded_once_each():
    ids, mask, uids, umask = _prompts(3, seed=4)
    # a 9-candidate request: one prompt, one unconditional text
    nine = [np.repeat(a[:1], 9, axis=0) for a in (ids, mask, uids, umask)]
    t_ids, t_mask, row = distinct_texts(*nine, max_size=32)
    assert t_ids.shape == t_mask.shape == (2, T) and row.shape == (9, 2)
    np.testing.assert_array_equal(t_ids[row[:, 0]], nine[0])
    np.testing.assert_array_equal(t_ids[row[:, 1]], nine[2])
    assert len(set(row[:, 0])) == 1 and row[0, 0] != row[0, 1]
    # three prompts sharing the unconditional text: 4 texts, each candidate pointed at its own
    t_ids, t_mask, row = distinct_texts(ids, mask, uids, umask, max_size=8)
    assert t_ids.shape == (4, T) and len(set(row[:, 0])) == 3 and len(set(row[:, 1])) == 1
    for i in range(3):
        np.testing.assert_array_equal(t_ids[row[i, 0]], ids[i])
        np.testing.assert_array_equal(t_mask[row[i, 0]], mask[i])
        np.testing.assert_array_equal(t_mask[row[i, 1]], umask[i])
    # the same ids with another mask is another text; the same ids and mask is the same text
    ids2, mask2 = ids.copy(), mask.copy()
    ids2[2], mask2[2] = ids[0], 1 - mask[0]
    assert len(set(distinct_texts(ids2, mask2, uids, umask, max_size=8)[2][:, 0])) == 3
    mask2[2] = mask[0]
    t_ids, _, row = distinct_texts(ids2, mask2, uids, umask, max_size=8)
    assert t_ids.shape == (4, T) and row[2, 0] == row[0, 0] != row[1, 0]  # 3 texts, padded to 4
    # 5 texts: padded to the next power of two, 8, but never beyond the pass's 2B rows
    four = _prompts(4, seed=5)
    assert distinct_texts(*four, max_size=8)[0].shape == (8, T)
    assert distinct_texts(*four, max_size=6)[0].shape == (6, T)
    assert text_sizes(1) == [2] and text_sizes(4) == [2, 4, 8] and text_sizes(3) == [2, 4, 6]


def test_bad_input_is_rejected(sampler):
    ids, mask, uids, umask = _prompts(2)
    with pytest.raises(ValueError, match="largest batch bucket"):
        sampler.sample(*_prompts(5), seeds=[0] * 5, indices=range(5))
    with pytest.raises(ValueError, match="temperature"):
        sampler.sample(ids, mask, uids, umask, [0, 1], [0, 1], temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sampler.sample(ids, mask, uids, umask, [0, 1], [0, 1], top_p=0.0)
    with pytest.raises(ValueError, match="uncond_mask"):
        sampler.sample(ids, mask, uids, umask[:, :4], [0, 1], [0, 1])


# ----------------------------------------------------------------------------------------------
# the sampler end to end
# ----------------------------------------------------------------------------------------------


def test_same_seed_same_tokens_alone_or_batched(sampler):
    ids, mask, uids, umask = _prompts(4, seed=3)
    kw = dict(scale=[10.0, 3.0, 10.0, 1.0], top_k=[50, 5, 0, 20], top_p=[1.0, 0.9, 0.7, 1.0],
              temperature=[1.0, 0.7, 1.5, 1.0])
    batched = sampler.sample(ids, mask, uids, umask, seeds=[42, 7, 42, 9], indices=[0, 0, 1, 3], **kw)
    assert batched.shape == (4, CFG.image_length) and batched.dtype == np.int32
    assert batched.max() < CFG.num_image_codes and batched.min() >= 0
    for row in (0, 2):  # rows of the same request (seed 42) sampled alone, padded to bucket 1
        alone = sampler.sample(
            ids[row : row + 1], mask[row : row + 1], uids[:1], umask[:1], seeds=[42], indices=[[0, 0, 1][row]],
            **{k: [v[row]] for k, v in kw.items()},
        )
        np.testing.assert_array_equal(alone[0], batched[row])
    # padding up to a bucket (3 rows -> 4) and row order do not matter either
    perm = [2, 0, 1]
    three = sampler.sample(
        ids[perm], mask[perm], uids[perm], umask[perm], seeds=[42, 42, 7], indices=[1, 0, 0],
        **{k: [v[i] for i in perm] for k, v in kw.items()},
    )
    np.testing.assert_array_equal(three, batched[perm])
    other_seed = sampler.sample(ids[:1], mask[:1], uids[:1], umask[:1], seeds=[43], indices=[0], **{
        k: [v[0]] for k, v in kw.items()})
    assert not np.array_equal(other_seed[0], batched[0])


def test_step_logits_equal_full_forward_and_top_k_1_is_argmax(sampler, params):
    ids, mask, uids, umask = _prompts(2, seed=5)
    tokens, logits = sampler.sample_with_logits(ids, mask, uids, umask, [1, 2], [0, 1], scale=[10.0, 4.0], top_k=1)
    assert logits.shape == (2, 2, CFG.image_length, CFG.image_vocab_size + 1)
    # teacher-force the sampled tokens through the plain (non-cached) decoder, both branches
    model = DalleBart(CFG)
    variables = {"params": params}
    dec_in = np.concatenate([np.full((2, 1), CFG.decoder_start_token_id), tokens[:, :-1]], axis=1)
    forward = jax.jit(lambda v, i, m, d: model.apply(v, d, model.apply(v, i, m, method=model.encode), m,
                                                     method=model.decode))
    for branch, (bi, bm) in enumerate(((ids, mask), (uids, umask))):
        full = forward(variables, bi, bm, jnp.asarray(dec_in, jnp.int32))
        np.testing.assert_allclose(logits[:, branch], np.asarray(full), atol=1e-4, rtol=1e-4)
    # top_k = 1: every token is the argmax of the guided logits over the valid codes
    n = CFG.num_image_codes
    for row, scale in enumerate((10.0, 4.0)):
        c, u = logits[row, 0, :, :n], logits[row, 1, :, :n]
        np.testing.assert_array_equal(tokens[row], np.argmax(u + scale * (c - u), axis=-1))


def test_published_kernel_layout_samples_like_the_transposed_one(sampler, params):
    # the accelerator layout (kernels as published, no transposes around the GEMMs) is the same function
    assert sampler.transposed_kernels == (jax.devices()[0].platform == "cpu")  # the per-platform default
    transposed = Sampler(None, params, CFG, jnp.float32, buckets=(1, 4), transposed_kernels=True)
    published = Sampler(None, params, CFG, jnp.float32, buckets=(1, 4), transposed_kernels=False)
    assert transposed.transposed_kernels and not published.transposed_kernels
    assert published.params["lm_head"]["kernel"].shape == (CFG.d_model, CFG.image_vocab_size + 1)
    assert transposed.params["lm_head"]["kernel"].shape == (CFG.image_vocab_size + 1, CFG.d_model)
    ids, mask, uids, umask = _prompts(2, seed=5)
    kw = dict(scale=[10.0, 4.0], top_k=1)
    tokens, logits = transposed.sample_with_logits(ids, mask, uids, umask, [1, 2], [0, 1], **kw)
    tokens_p, logits_p = published.sample_with_logits(ids, mask, uids, umask, [1, 2], [0, 1], **kw)
    np.testing.assert_array_equal(tokens_p, tokens)
    np.testing.assert_allclose(logits_p, logits, atol=1e-4, rtol=1e-4)


def test_never_emits_ids_outside_the_codebook(params):
    # make the lm_head favour the padding/start ids (>= num_image_codes) overwhelmingly
    boosted = jax.tree.map(np.array, params)
    boosted["lm_head"]["kernel"][:, CFG.num_image_codes :] += 50.0
    s = Sampler(None, unscan_params(boosted), CFG, buckets=(1,))
    ids, mask, uids, umask = _prompts(1)
    tokens, logits = s.sample_with_logits(ids, mask, uids, umask, [0], [0], scale=1.0, top_k=0)
    assert logits[0, 0].argmax(-1).min() >= CFG.num_image_codes  # the raw argmax is outside the codebook...
    assert tokens.max() < CFG.num_image_codes  # ...but nothing outside it is ever sampled


def test_progress_hook_chunks_give_the_same_tokens(sampler, params):
    s = Sampler(None, scan_params(params), CFG, buckets=(1,), chunk_size=6)  # scanned input layout converted
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(s.params))  # a numpy tree ends up on the device
    ids, mask, uids, umask = _prompts(1, seed=9)
    plain = sampler.sample(ids, mask, uids, umask, [11], [2])
    compiled = s.warmup(chunked=True)  # encoder, state and 6- and 4-step chunk programs, compiled without running
    seen = []
    hooked = s.sample(ids, mask, uids, umask, [11], [2], on_chunk=lambda done, toks: seen.append((done, toks.copy())))
    np.testing.assert_array_equal(plain, hooked)
    assert s._progs.num_compiled == compiled  # sampling after warmup compiled nothing new
    assert [d for d, _ in seen] == [6, 12, 16]
    for done, toks in seen:
        np.testing.assert_array_equal(toks, plain[:, :done])

    def stop(done, toks):
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        s.sample(ids, mask, uids, umask, [11], [2], on_chunk=stop)


def test_blocked_cache_gives_the_same_tokens_and_logits(sampler, params):
    """A KV cache in 4 blocks (of 4 positions here): the steps of block k read blocks 0..k only. Same tokens and
    step logits as the one-array cache, whole loop or in chunks that straddle blocks (one loop per block a chunk
    touches), and after a chunked warmup sampling compiles nothing new."""
    assert sampler.cache_blocks == 1  # the default below the published sizes
    blocked = Sampler(None, params, CFG, buckets=(1, 4), chunk_size=6, cache_blocks=4)
    assert blocked._progs.pieces(0, 16) == ((0, 4), (1, 4), (2, 4), (3, 4))
    assert blocked._progs.pieces(6, 6) == ((1, 2), (2, 4)) and blocked._progs.pieces(12, 4) == ((3, 4),)
    ids, mask, uids, umask = _prompts(3, seed=4)
    kw = dict(scale=[10.0, 3.0, 1.0], top_k=[50, 5, 0], temperature=[1.0, 0.7, 1.5])
    tokens, logits = sampler.sample_with_logits(ids, mask, uids, umask, [5, 6, 7], [0, 1, 2], **kw)
    tokens_b, logits_b = blocked.sample_with_logits(ids, mask, uids, umask, [5, 6, 7], [0, 1, 2], **kw)
    np.testing.assert_array_equal(tokens_b, tokens)
    np.testing.assert_allclose(logits_b, logits, atol=1e-4, rtol=1e-4)
    compiled = blocked.warmup(chunked=True)
    seen = []
    hooked = blocked.sample(ids, mask, uids, umask, [5, 6, 7], [0, 1, 2], on_chunk=lambda d, t: seen.append(d), **kw)
    np.testing.assert_array_equal(hooked, tokens)
    assert seen == [6, 12, 16] and blocked._progs.num_compiled == compiled
    with pytest.raises(ValueError, match="must divide"):
        Sampler(None, params, CFG, buckets=(1,), cache_blocks=3)
    from engine.attention.xla import default_cache_blocks
    from engine.config import preset

    assert default_cache_blocks(preset("mini")) == 4 and default_cache_blocks(preset("mega")) == 4
    assert default_cache_blocks(CFG) == 1


def test_warmup_compiles_every_text_count_of_a_bucket(params):
    s = Sampler(None, params, CFG, buckets=(4,))
    compiled = s.warmup()
    assert compiled == s._progs.num_compiled > 0
    for n in (1, 2, 3, 4):  # 2, 3, 4 and 5 distinct texts: encoders of 2, 4, 8 and 8 rows
        prompts = _prompts(n, seed=n)
        s.sample(*prompts, seeds=list(range(n)), indices=[0] * n)
    assert s._progs.num_compiled == compiled  # sampling after warmup compiled nothing new


def test_lazy_text_programs_compile_only_the_counts_passes_need():
    cfg = tiny_config(decoder_ffn_dim=40)  # a config of its own: compiled programs are shared per config and dtype
    p = random_params(cfg, seed=1, std=0.1)
    lazy = Sampler(None, p, cfg, buckets=(4,), eager_text_programs=False)

    def compiled(s):
        return sorted(key[0] for key in s._progs._executables)

    ids, mask, uids, umask = _prompts(3, seed=9)
    one = (np.repeat(ids[:1], 2, 0), np.repeat(mask[:1], 2, 0), uids[:2], umask[:2])  # 2 texts: prompt + empty
    first = lazy.sample(*one, seeds=[5, 5], indices=[0, 1])
    assert compiled(lazy) == ["chunk", "encode", "prepare"]
    lazy.sample(ids, mask, uids, umask, seeds=[1, 2, 3], indices=[0, 0, 0])  # 4 texts: one more of each
    assert compiled(lazy) == ["chunk", "encode", "encode", "prepare", "prepare"]
    # the eager default compiles every count at a bucket's first pass; the tokens are the same either way
    eager = Sampler(None, p, cfg, buckets=(4,))
    np.testing.assert_array_equal(eager.sample(*one, seeds=[5, 5], indices=[0, 1]), first)
    assert compiled(eager).count("encode") == len(text_sizes(4))


def test_bfloat16_sampler_close_to_float32(sampler, params):
    ids, mask, uids, umask = _prompts(1, seed=4)
    _, ref = sampler.sample_with_logits(ids, mask, uids, umask, [3], [0], top_k=1)
    s16 = Sampler(None, params, CFG, jnp.bfloat16, buckets=(1,))
    assert {x.dtype for x in jax.tree.leaves(s16.params)} == {jnp.dtype(jnp.bfloat16)}
    tokens, logits = s16.sample_with_logits(ids, mask, uids, umask, [3], [0], top_k=1)
    assert logits.dtype == np.float32 and tokens.max() < CFG.num_image_codes
    # the first step sees identical inputs in both runs: only bf16 rounding separates them
    np.testing.assert_allclose(logits[:, :, 0], ref[:, :, 0], atol=0.05 * np.abs(ref[:, :, 0]).max())
