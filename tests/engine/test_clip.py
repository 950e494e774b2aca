"""CLIP: parity with transformers' PyTorch CLIPModel, published parameter counts, preprocessing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from engine.config import CLIPConfig, preset
from engine.convert import clip_from_torch
from engine.models.clip import CLIP_MEAN, CLIP_STD, CLIPModel, param_shapes, preprocess

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_RAW = {
    "text_config": {
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 98, "eos_token_id": 99,
        "pad_token_id": 99,
    },
    "vision_config": {
        "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "projection_dim": 24,
    "logit_scale_init_value": 2.6592,
}


def _hf_config(cfg: CLIPConfig, **kw):
    return transformers.CLIPConfig(
        text_config=cfg.text_config.to_dict(), vision_config=cfg.vision_config.to_dict(),
        projection_dim=cfg.projection_dim, logit_scale_init_value=cfg.logit_scale_init_value, **kw,
    )


def _shapes(cfg: CLIPConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return flatten_dict(param_shapes(cfg), sep="/")


@pytest.mark.parametrize("name,published", [("clip-b32", 151_277_313), ("clip-l14", 427_616_513)])
def test_param_counts_match_transformers_and_openai(name, published):
    cfg = preset(name)
    ours = _shapes(cfg)
    with torch.device("meta"):
        ref = transformers.CLIPModel(_hf_config(cfg))
    assert sum(v.size for v in ours.values()) == sum(p.numel() for p in ref.parameters()) == published
    # and the torch names convert onto exactly our tree (names and shapes)
    converted = flatten_dict(
        clip_from_torch({k: np.empty(v.shape, np.float32) for k, v in ref.state_dict().items()}), sep="/"
    )
    assert set(converted) == set(ours)
    bad = [k for k in ours if converted[k].shape != ours[k].shape]
    assert not bad, bad[:3]
    assert ours["text_model/encoder/layers/0/self_attn/q_proj/kernel"].shape == (cfg.text_config.hidden_size,) * 2
    assert ours["logit_scale"].shape == ()
    assert "vision_model/pre_layrnorm/scale" in ours
    assert "vision_model/embeddings/patch_embedding/bias" not in ours
    assert "visual_projection/bias" not in ours and "text_projection/bias" not in ours


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = CLIPConfig.from_dict(TINY_RAW)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(_hf_config(cfg, attn_implementation="eager")).eval()
    with torch.no_grad():  # perturb every tensor so scale/bias/transposes all matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    params = jax.tree.map(jnp.asarray, clip_from_torch(ref.state_dict()))
    return cfg, ref, params


def _text_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 98, size=(3, 16))
    mask = np.zeros((3, 16), np.int64)
    for i, n in enumerate([5, 16, 9]):
        ids[i, 0] = 98
        ids[i, n - 1 :] = 99  # EOS, then EOS-padding as the CLIP tokenizer pads
        mask[i, :n] = 1
    return ids, mask


def _pooled(out):
    return (getattr(out, "pooler_output", out)).numpy()


def test_embeddings_match_transformers(tiny_pair):
    cfg, ref, params = tiny_pair
    ids, mask = _text_batch()
    pix = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        t_img = _pooled(ref.get_image_features(pixel_values=torch.tensor(pix)))
        t_txt = _pooled(ref.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)))
        t_out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pix))
    model = CLIPModel(cfg)
    pix_nhwc = jnp.asarray(pix.transpose(0, 2, 3, 1))

    @jax.jit
    def run(p, ids, pix, mask):
        v = {"params": p}
        img = model.apply(v, pix, method=CLIPModel.get_image_features)
        txt = model.apply(v, ids, mask, method=CLIPModel.get_text_features)
        return img, txt, model.apply(v, ids, pix, mask)

    img, txt, (lpi, lpt, ie, te) = run(params, jnp.asarray(ids), pix_nhwc, jnp.asarray(mask))
    assert img.shape == (2, 24) and txt.shape == (3, 24)
    assert np.abs(np.asarray(img) - t_img).max() <= 1e-4
    assert np.abs(np.asarray(txt) - t_txt).max() <= 1e-4
    assert lpi.shape == (2, 3) and lpt.shape == (3, 2)
    np.testing.assert_allclose(np.asarray(lpi), t_out.logits_per_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(lpt), t_out.logits_per_text.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ie), t_out.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(te), t_out.text_embeds.numpy(), atol=1e-5)


def test_text_pooling_is_at_eos_and_causal(tiny_pair):
    cfg, _, params = tiny_pair
    ids, mask = _text_batch()
    f = jax.jit(lambda p, i, m: CLIPModel(cfg).apply({"params": p}, i, m, method=CLIPModel.get_text_features))
    base = np.asarray(f(params, jnp.asarray(ids), jnp.asarray(mask)))
    changed = ids.copy()
    changed[0, 6:] = 7  # tokens after row 0's EOS (position 4) cannot reach it through the causal mask
    changed[0, 5] = 99
    after = np.asarray(f(params, jnp.asarray(changed), jnp.asarray(mask)))
    np.testing.assert_allclose(after[0], base[0], atol=1e-6)
    changed[0, 2] = 51  # a token before EOS does (it was 50)
    assert np.abs(np.asarray(f(params, jnp.asarray(changed), jnp.asarray(mask)))[0] - base[0]).max() > 1e-4


def test_wrong_image_size_is_a_clear_error(tiny_pair):
    cfg, _, params = tiny_pair
    with pytest.raises(ValueError, match="expected 32×32"):
        CLIPModel(cfg).apply({"params": params}, jnp.zeros((1, 224, 224, 3)), method=CLIPModel.get_image_features)


def test_preprocess_constant_image_and_dtypes():
    mean, std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
    img = np.zeros((2, 300, 400, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 128, 0
    out = np.asarray(preprocess(img))
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to((np.array([1.0, 128 / 255, 0.0]) - mean) / std, out.shape),
                               atol=1e-5)
    # a float [0, 1] image is not divided by 255 again; already-224 input is untouched apart from normalising
    f = np.random.default_rng(0).uniform(size=(1, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(preprocess)(f)), (f - mean) / std, atol=1e-5)


def test_preprocess_centre_crops_the_long_side():
    # three 224-wide vertical bands: the crop is the middle one exactly (no resize needed: short side 224)
    img = np.zeros((1, 224, 672, 3), np.float32)
    img[:, :, :224] = 0.1
    img[:, :, 224:448] = 0.6
    img[:, :, 448:] = 0.9
    out = np.asarray(preprocess(img))
    np.testing.assert_allclose(out * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN), 0.6, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        preprocess(np.zeros((224, 224, 3), np.uint8))


def test_preprocess_close_to_hf_image_processor():
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = proc_cls()
    rng = np.random.default_rng(0)
    smooth = np.asarray(jax.image.resize(rng.uniform(size=(1, 12, 16, 3)), (1, 300, 400, 3), "linear"))
    img = (np.clip(smooth, 0, 1) * 255).astype(np.uint8)
    hf = proc(images=list(img), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(preprocess(img))
    assert ours.shape == hf.shape == (1, 224, 224, 3)
    # HF rounds the resized image to uint8 (PIL); we stay in float: about one grey level / std apart
    assert np.abs(ours - hf).max() < 0.03
    assert np.abs(ours - hf).mean() < 0.01
