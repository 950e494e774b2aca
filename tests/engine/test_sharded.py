"""Sharded sampling: the same seeds give the same tokens on one device and on (data, model) meshes of 8 fake CPUs.

The meshes run in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device
count is fixed when JAX starts); the single-device reference runs in this process, on its one CPU device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.sampling import Sampler
from engine.sharding import MODEL, P
from tests.fakes.dallebart import random_params, tiny_config

ROOT = Path(__file__).resolve().parents[2]

# d 32, 4 heads: the GLU width 48 divides every model-axis size used below, the lm_head's 65 rows divide nothing
DIVIDES = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48)
# decoder GLU width 42 is split by neither 4 nor 8: its kernels fall back to the other dim (d_model)
GLU_42 = dict(DIVIDES, decoder_ffn_dim=42)
CONFIGS = {"divides": DIVIDES, "glu42": GLU_42}
MESHES = {"data8": 1, "data2_model4": 4, "model8": 8}  # name -> model_parallel over 8 devices

SEEDS, INDICES = [5, 6, 5], [0, 0, 1]
SAMPLING = dict(scale=[3.0, 1.0, 5.0], top_k=[50, 5, 0], top_p=[1.0, 0.9, 1.0], temperature=[1.0, 1.3, 0.8])


def requests(config) -> tuple[np.ndarray, ...]:
    """Three prompts of different lengths and the empty prompt, as (ids, mask, uncond ids, uncond mask)."""
    t = config.max_text_length
    rng = np.random.default_rng(0)
    ids = np.ones((3, t), np.int32)
    mask = np.zeros((3, t), np.int32)
    for i, length in enumerate((5, 12, 16)):
        ids[i, :length] = rng.integers(3, config.encoder_vocab_size, size=length)
        mask[i, :length] = 1
    uids = np.ones((3, t), np.int32)
    uids[:, :2] = [0, 2]
    umask = np.zeros((3, t), np.int32)
    umask[:, :2] = 1
    return ids, mask, uids, umask


def run_with_devices(code: str, devices: int = 8, timeout: float = 240, args: tuple[str, ...] = ()) -> dict:
    """Run ``code`` in a fresh Python with ``devices`` fake CPU devices; its last stdout line is JSON."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MESH_SCRIPT = """
import json
import jax
import numpy as np
from engine import sharding
from engine.sampling import Sampler
from engine.sharding import MODEL, P
from tests.fakes.dallebart import random_params, tiny_config
from tests.engine.test_sharded import CONFIGS, INDICES, MESHES, SAMPLING, SEEDS, requests

assert jax.device_count() == 8
out = {"tokens": {}, "specs": {}, "native": {}}
for cname, overrides in CONFIGS.items():
    cfg = tiny_config(**overrides)
    params = random_params(cfg, seed=7, std=0.1)
    ids, mask, uids, umask = requests(cfg)
    for mname, mp in MESHES.items():
        if cname == "glu42" and mp == 1:
            continue  # nothing is split over "model": the fallback is not exercised
        mesh = sharding.make_mesh(mp)
        s = Sampler(None, params, cfg, buckets=(1, 4), mesh=mesh)
        batched = s.sample(ids, mask, uids, umask, SEEDS, INDICES, **SAMPLING)
        out["tokens"][f"{cname}/{mname}"] = batched.tolist()
        out["native"][f"{cname}/{mname}"] = s.native_attention
        layer = s.params["model"]["decoder"]["layers"]["FlaxBartDecoderLayer_0"]
        out["specs"][f"{cname}/{mname}"] = {
            "glu_in": str(layer["GLU_0"]["Dense_0"]["kernel"].sharding.spec),
            "q": str(layer["FlaxBartAttention_0"]["q_proj"]["kernel"].sharding.spec),
            "q_shard": list(layer["FlaxBartAttention_0"]["q_proj"]["kernel"].addressable_shards[0].data.shape),
            "rows": s.padded_rows(3),
        }
        if mname == "data8" and cname == "divides":
            # alone (1 row padded to 8) vs batched: the same program, another row position
            alone = s.sample(ids[2:], mask[2:], uids[2:], umask[2:], SEEDS[2:], INDICES[2:],
                             **{k: v[2:] for k, v in SAMPLING.items()})
            out["alone_row2"] = alone[0].tolist()
            out["compiled"] = sorted(key[0] for key in s._progs._executables)
        if mname == "data2_model4" and cname == "divides":
            seen = []
            hooked = s.sample(ids, mask, uids, umask, SEEDS, INDICES, **SAMPLING,
                              on_chunk=lambda done, toks: seen.append(done))
            out["hooked"] = hooked.tolist()
            out["hook_steps"] = seen
            # the accelerators' default layout: kernels as published, (in, out), sharded by the rules unchanged
            pub = Sampler(None, params, cfg, buckets=(1, 4), mesh=mesh, transposed_kernels=False)
            out["published"] = pub.sample(ids, mask, uids, umask, SEEDS, INDICES, **SAMPLING).tolist()
            pl = pub.params["model"]["decoder"]["layers"]["FlaxBartDecoderLayer_0"]["FlaxBartAttention_0"]
            out["published_q"] = str(pl["q_proj"]["kernel"].sharding.spec)
            # XLA's attention (what accelerator meshes run) on the same CPU mesh
            xla = Sampler(None, params, cfg, buckets=(1, 4), mesh=mesh, native_attention=False)
            out["xla_attention"] = xla.sample(ids, mask, uids, umask, SEEDS, INDICES, **SAMPLING).tolist()
            # a KV cache in 4 blocks (each sharded like the one array), chunks of 6 straddling them
            blk = Sampler(None, params, cfg, buckets=(1, 4), mesh=mesh, cache_blocks=4, chunk_size=6)
            seen = []
            out["blocked"] = blk.sample(ids, mask, uids, umask, SEEDS, INDICES, **SAMPLING,
                                        on_chunk=lambda done, toks: seen.append(done)).tolist()
            out["blocked_hook_steps"] = seen
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_run() -> dict:
    return run_with_devices(MESH_SCRIPT)


@pytest.mark.parametrize("cname", sorted(CONFIGS))
def test_same_tokens_on_one_device_and_on_meshes(mesh_run, cname):
    cfg = tiny_config(**CONFIGS[cname])
    single = Sampler(None, random_params(cfg, seed=7, std=0.1), cfg, buckets=(1, 4))
    want = single.sample(*requests(cfg), SEEDS, INDICES, **SAMPLING)
    assert len({tuple(row) for row in want.tolist()}) == 3 and len(set(want.ravel().tolist())) > 8  # not degenerate
    runs = {k.split("/")[1]: v for k, v in mesh_run["tokens"].items() if k.startswith(cname + "/")}
    assert set(runs) == ({"data2_model4", "model8"} if cname == "glu42" else set(MESHES))
    for mname, tokens in runs.items():
        np.testing.assert_array_equal(np.asarray(tokens), want, err_msg=f"{cname} on {mname}")
    # on CPU in float32 both sides decode with the native attention where it can be built, each mesh device on
    # its own rows and heads
    assert {mesh_run["native"][f"{cname}/{m}"] for m in runs} == {single.native_attention}


def test_xla_attention_on_a_mesh_gives_the_same_tokens(mesh_run):
    cfg = tiny_config(**CONFIGS["divides"])
    single = Sampler(None, random_params(cfg, seed=7, std=0.1), cfg, buckets=(1, 4), native_attention=False)
    want = single.sample(*requests(cfg), SEEDS, INDICES, **SAMPLING)
    np.testing.assert_array_equal(np.asarray(mesh_run["xla_attention"]), want)


def test_blocked_cache_on_a_mesh_gives_the_same_tokens(mesh_run):
    cfg = tiny_config(**CONFIGS["divides"])
    single = Sampler(None, random_params(cfg, seed=7, std=0.1), cfg, buckets=(1, 4))
    np.testing.assert_array_equal(np.asarray(mesh_run["blocked"]), single.sample(*requests(cfg), SEEDS, INDICES,
                                                                                  **SAMPLING))
    assert mesh_run["blocked_hook_steps"] == [6, 12, 16]


def test_params_are_split_over_model_and_rows_padded_to_the_data_axis(mesh_run):
    specs = mesh_run["specs"]
    # the sampler keeps kernels transposed, (out, in) (engine.models.layout.to_decode_layout), and their specs too.
    # q_proj (32, 32) splits its output dim over "model"; the (2, 4) mesh keeps 32 / 4 output rows per device
    assert specs["divides/data2_model4"]["q"] == str(P(MODEL, None))
    assert specs["divides/data2_model4"]["q_shard"] == [8, 32]
    assert specs["divides/model8"]["q_shard"] == [4, 32]
    assert specs["divides/data8"]["q_shard"] == [32, 32]  # model axis of size 1: whole on every device
    assert specs["divides/model8"]["glu_in"] == str(P(MODEL, None))
    # GLU width 42: neither 4 nor 8 divides it, so the input dim (d_model 32) is split instead
    assert specs["glu42/data2_model4"]["glu_in"] == str(P(None, MODEL))
    assert specs["glu42/model8"]["glu_in"] == str(P(None, MODEL))
    # 3 candidates: bucket 4, then a multiple of the data-axis size
    assert specs["divides/data8"]["rows"] == 8
    assert specs["divides/data2_model4"]["rows"] == 4
    assert specs["divides/model8"]["rows"] == 4


def test_alone_vs_batched_and_progress_hook_on_a_mesh(mesh_run):
    batched = np.asarray(mesh_run["tokens"]["divides/data8"])
    assert mesh_run["alone_row2"] == batched[2].tolist()
    # 1 and 3 candidates both run as 8 rows: one decoder loop, and (compiled at the first 8-row pass) an encoder
    # and a state program for each number of distinct texts 8 rows can hold: 2, 4, 8, 16
    assert mesh_run["compiled"] == ["chunk"] + ["encode"] * 4 + ["prepare"] * 4
    assert mesh_run["hooked"] == mesh_run["tokens"]["divides/data2_model4"]
    assert mesh_run["hook_steps"] == [16]  # chunk_size 32 > image_length 16: one chunk


def test_published_kernel_layout_on_a_mesh(mesh_run):
    # transposed_kernels=False (the default on accelerators): (in, out) kernels keep the rules' own specs
    assert mesh_run["published_q"] == str(P(None, MODEL))
    assert mesh_run["published"] == mesh_run["tokens"]["divides/data2_model4"]


def fast_random_checkpoint(directory: Path) -> Path:
    """A tiny checkpoint (DalleBart + VQGAN, no CLIP) in the published layout, with numpy-random weights: the
    DalleBart's drawn wider (std 0.3) than :func:`training.fixtures.random_checkpoint` draws them, so that its
    candidates differ visibly."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from engine.models import vqgan as vqgan_model
    from training.fixtures import CORPUS, tiny_configs, write_checkpoint
    from training.tokenizer import train_bpe

    db_cfg, vq_cfg, _ = tiny_configs()
    vq = vqgan_model.VQModel(vq_cfg, norm_groups=vq_cfg.norm_groups)
    res = vq_cfg.resolution
    shapes = jax.eval_shape(lambda r: vq.init(r, jnp.zeros((1, res, res, 3), jnp.float32))["params"],
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    flat = {}
    for path, spec in traverse_util.flatten_dict(shapes).items():
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        fan_in = int(np.prod(spec.shape[:-1])) if len(spec.shape) > 1 else 1
        flat[path] = {"scale": 1.0 + 0.1 * noise, "bias": 0.1 * noise}.get(path[-1], noise / np.sqrt(fan_in))
    tok_dir = train_bpe(CORPUS, db_cfg.encoder_vocab_size, directory.parent / "tok")
    return write_checkpoint(
        directory, dallebart=(db_cfg, random_params(db_cfg, seed=3, std=0.3), tok_dir),
        vqgan=(vq_cfg, traverse_util.unflatten_dict(flat)), checkpoint_id="fast-random",
    )


PIPELINE_SCRIPT = """
import json, sys
from engine.api import GenerationRequest, SamplingParams
from engine.pipeline import load_pipeline

reqs = [GenerationRequest("a red circle", n=3, seed=11, params=SamplingParams(top_k=8, condition_scale=3.0)),
        GenerationRequest("a blue star", n=2, seed=12)]
out = {}
for name, opts in (("single", {}), ("model_parallel2", {"model_parallel": 2})):
    pipe = load_pipeline(sys.argv[1], buckets=(8,), **opts)
    results = pipe.generate(reqs)
    out[name] = {
        "mesh": None if pipe.mesh is None else dict(pipe.mesh.shape),
        "images": [[(im.index, im.tokens.tolist(), im.png.hex()) for im in r.images] for r in results],
    }
print(json.dumps(out))
"""


def test_pipeline_with_model_parallel_gives_the_same_images(tmp_path):
    directory = fast_random_checkpoint(tmp_path / "ckpt")
    out = run_with_devices(PIPELINE_SCRIPT, args=(str(directory),))
    assert out["single"]["mesh"] is None
    assert out["model_parallel2"]["mesh"] == {"data": 4, "model": 2}
    assert out["model_parallel2"]["images"] == out["single"]["images"]
    images = [im for r in out["single"]["images"] for im in r]
    assert len({tuple(im[1]) for im in images}) == 5  # five different candidates, not one repeated
    assert len({im[2] for im in images}) == 5  # and five different pictures
