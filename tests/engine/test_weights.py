"""engine.weights: published checkpoint layouts load, bad checkpoints fail clearly, casting, our own I/O."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from engine import weights
from engine.config import CLIPConfig, VQGANConfig
from engine.convert import ConversionError, clip_from_torch, vqgan_from_torch
from engine.models.clip import CLIPModel, dummy_inputs
from engine.models.vqgan import VQModel
from engine.weights import CheckpointError, cast_tree, check_tree, load_params

TINY_VQ = VQGANConfig(
    resolution=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=4, embed_dim=4, n_embed=16
)
TINY_CLIP = CLIPConfig.from_dict({
    "text_config": {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 8},
    "vision_config": {"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 24,
                      "num_hidden_layers": 1, "num_attention_heads": 2},
    "projection_dim": 8,
})


def _random_like(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def vq_shapes():
    return jax.eval_shape(lambda: VQModel(TINY_VQ).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))["params"]


@pytest.fixture(scope="module")
def clip_shapes():
    return jax.eval_shape(
        lambda: CLIPModel(TINY_CLIP).init(jax.random.PRNGKey(0), *dummy_inputs(TINY_CLIP))
    )["params"]


def _assert_same(a, b):
    fa, fb = flatten_dict(a, sep="/"), flatten_dict(b, sep="/")
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


def test_hf_flax_msgpack_loads(tmp_path, vq_shapes):
    params = _random_like(vq_shapes)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    loaded = load_params(tmp_path, vq_shapes)  # a directory resolves to its flax_model.msgpack
    _assert_same(loaded, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))


def test_chunked_array_msgpack_loads(tmp_path, vq_shapes):
    params = _random_like(vq_shapes)
    emb = params["quantize"]["embedding"]["embedding"]
    flat = emb.reshape(-1)
    raw = dict(params)
    raw["quantize"] = {"embedding": {"embedding": {
        "__msgpack_chunked_array__": True,
        "shape": {"0": emb.shape[0], "1": emb.shape[1]},
        "chunks": {"0": flat[:20], "1": flat[20:50], "2": flat[50:]},
    }}}
    path = tmp_path / "chunked.msgpack"
    path.write_bytes(serialization.msgpack_serialize(raw))
    loaded = load_params(path, vq_shapes)
    np.testing.assert_array_equal(np.asarray(loaded["quantize"]["embedding"]["embedding"]), emb)


def test_hf_sharded_msgpack_index_loads(tmp_path, vq_shapes):
    params = _random_like(vq_shapes)
    flat = flatten_dict(params, sep="/")
    keys = sorted(flat)
    halves = {"flax_model-00001-of-00002.msgpack": keys[::2], "flax_model-00002-of-00002.msgpack": keys[1::2]}
    weight_map = {}
    for fname, ks in halves.items():
        shard = unflatten_dict({k: flat[k] for k in ks}, sep="/")
        (tmp_path / fname).write_bytes(serialization.msgpack_serialize(shard))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "flax_model.msgpack.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same(load_params(tmp_path, vq_shapes), params)


def test_flax_safetensors_loads(tmp_path, clip_shapes):
    params = _random_like(clip_shapes)
    path = weights.save_safetensors(tmp_path / "model.safetensors", params)
    assert weights.safetensors_format(path) == "flax"
    _assert_same(load_params(path, clip_shapes), params)


def _torch_clip_state(clip_shapes):
    """Our tree → a PyTorch-layout HF CLIPModel state dict (the inverse rules, written out independently)."""
    flat = flatten_dict(_random_like(clip_shapes, seed=3), sep=".")
    state = {}
    for k, v in flat.items():
        if k.endswith(".kernel"):
            base = k[: -len(".kernel")]
            state[base + ".weight"] = np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else v.T
        elif k.endswith(".scale"):
            state[k[: -len(".scale")] + ".weight"] = v
        elif k.endswith(".embedding"):
            state[k[: -len(".embedding")] + ".weight"] = v
        else:
            state[k] = v
    state["text_model.embeddings.position_ids"] = np.arange(8, dtype=np.int64)[None]
    return {k: np.asarray(v, order="C") for k, v in state.items()}, flat


def test_pt_safetensors_goes_through_convert(tmp_path, clip_shapes):
    from safetensors.numpy import save_file

    state, flat = _torch_clip_state(clip_shapes)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    loaded = load_params(tmp_path, clip_shapes)
    _assert_same(loaded, unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()}))
    # the conversion is the one in engine.convert
    _assert_same(loaded, clip_from_torch(state))


def test_pytorch_bin_loads_when_torch_is_installed(tmp_path, clip_shapes):
    torch = pytest.importorskip("torch")
    state, _ = _torch_clip_state(clip_shapes)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    _assert_same(load_params(tmp_path, clip_shapes), clip_from_torch(state))


def test_taming_vqgan_state_dict_converts(vq_shapes):
    flat = flatten_dict(_random_like(vq_shapes, seed=4), sep="/")
    state = {"loss.discriminator.main.0.weight": np.zeros((2, 2, 4, 4), np.float32)}
    for k, v in flat.items():
        parts = k.split("/")
        torch_parts = []
        for p in parts:
            head, _, idx = p.rpartition("_")
            torch_parts += [head, idx] if head in ("down", "up", "block", "attn") and idx.isdigit() else [p]
        name = ".".join(torch_parts)
        if name.endswith(".kernel"):
            state[name[:-7] + ".weight"] = np.transpose(v, (3, 2, 0, 1))
        elif name.endswith(".scale"):
            state[name[:-6] + ".weight"] = v
        elif name.endswith(".embedding.embedding"):
            state[name[: -len(".embedding")] + ".weight"] = v
        else:
            state[name] = v
    assert "decoder.up.1.block.0.conv1.weight" in state and "quantize.embedding.weight" in state
    converted = vqgan_from_torch({"state_dict": state})
    check_tree(converted, vq_shapes, "taming")
    _assert_same(converted, unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}))
    with pytest.raises(ConversionError, match="not a VQGAN"):
        vqgan_from_torch({"foo.weight": np.zeros((2, 2))})


def test_wrong_shape_missing_and_unexpected_fail_clearly(tmp_path, vq_shapes):
    params = _random_like(vq_shapes)
    flat = flatten_dict(params, sep="/")

    bad = dict(flat)
    bad["decoder/conv_in/kernel"] = np.zeros((3, 3, 4, 99), np.float32)
    with pytest.raises(CheckpointError) as e:
        check_tree(unflatten_dict(bad, sep="/"), vq_shapes, "tiny-vqgan")
    msg = str(e.value)
    assert "tiny-vqgan" in msg and "'decoder/conv_in/kernel'" in msg
    assert "(3, 3, 4, 99)" in msg and "(3, 3, 4, 16)" in msg

    missing = {k: v for k, v in flat.items() if k != "quantize/embedding/embedding"}
    missing.pop("decoder/norm_out/scale")
    path = weights.save_params(tmp_path / "m.msgpack", unflatten_dict(missing, sep="/"))
    with pytest.raises(CheckpointError, match=r"'decoder/norm_out/scale' is missing .*\(and 1 more problem"):
        load_params(path, vq_shapes)

    extra = dict(flat)
    extra["decoder/extra/bias"] = np.zeros(3, np.float32)
    path = weights.save_params(tmp_path / "x.msgpack", unflatten_dict(extra, sep="/"))
    with pytest.raises(CheckpointError, match=r"unexpected parameter 'decoder/extra/bias' with shape \(3,\)"):
        load_params(path, vq_shapes)
    # ...unless asked to drop what the model does not use
    _assert_same(load_params(path, vq_shapes, drop_unexpected=True), params)


def test_unreadable_files_fail_clearly(tmp_path, vq_shapes):
    with pytest.raises(CheckpointError, match="no checkpoint file found"):
        load_params(tmp_path, vq_shapes)
    (tmp_path / "flax_model.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable flax msgpack"):
        load_params(tmp_path, vq_shapes)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_params(tmp_path / "nope.safetensors", vq_shapes)


def test_dtype_casting(tmp_path, vq_shapes):
    params = _random_like(vq_shapes)
    tree = {"w": params["decoder"]["conv_out"]["kernel"], "step": np.arange(3, dtype=np.int32)}
    for name, want in [("bfloat16", jnp.bfloat16), ("fp16", jnp.float16), (jnp.float32, jnp.float32)]:
        out = cast_tree(tree, name)
        assert out["w"].dtype == want and out["step"].dtype == np.int32
    np.testing.assert_allclose(np.asarray(cast_tree(tree, "bf16")["w"], np.float32), tree["w"], rtol=1e-2)
    with pytest.raises(CheckpointError, match="unknown dtype"):
        cast_tree(tree, "float8")

    path = weights.save_params(tmp_path / "p.msgpack", params)
    half = load_params(path, vq_shapes, dtype="float16")
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.float16)}
    # a stored fp16 checkpoint keeps its dtype unless asked
    path16 = weights.save_params(tmp_path / "p16.msgpack", cast_tree(params, "float16"))
    assert {x.dtype for x in jax.tree.leaves(load_params(path16, vq_shapes))} == {jnp.dtype(jnp.float16)}
    assert {x.dtype for x in jax.tree.leaves(load_params(path16, vq_shapes, dtype="float32"))} == {
        jnp.dtype(jnp.float32)
    }


def test_save_restore_round_trip_and_normalize_hook(tmp_path, vq_shapes):
    params = jax.tree.map(jnp.asarray, _random_like(vq_shapes))
    path = weights.save_params(tmp_path / "ours" / "params.msgpack", {"params": params})
    # a saved ``variables`` dict is unwrapped; restore without a target returns the raw tree
    _assert_same(weights.restore_params(path, vq_shapes), params)
    assert set(weights.restore_params(path)) == {"params"}

    # the normalize hook sees the raw tree before the check (e.g. a layout converter)
    renamed = {"model": params}
    path2 = weights.save_params(tmp_path / "renamed.msgpack", renamed)
    with pytest.raises(CheckpointError, match="'decoder/conv_in/bias' is missing"):
        load_params(path2, vq_shapes)
    _assert_same(load_params(path2, vq_shapes, normalize=lambda t: t["model"]), params)


def test_orbax_sharded_round_trip(tmp_path, vq_shapes):
    params = jax.tree.map(jnp.asarray, _random_like(vq_shapes))
    d = weights.save_sharded(tmp_path / "orbax", params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    _assert_same(weights.restore_sharded(d, abstract), params)
    wrong = jax.tree.map(lambda x: x, abstract)
    wrong["quant_conv"]["bias"] = jax.ShapeDtypeStruct((5,), jnp.float32)
    with pytest.raises(CheckpointError, match=r"'quant_conv/bias' has shape \(4,\)"):
        weights.restore_sharded(d, wrong)
