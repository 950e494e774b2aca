"""Partition rules place the published DalleBart parameter names on a ("data", "model") mesh."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from engine import sharding
from engine.sharding import MODEL, P


def test_rules_shard_megatron_style_and_fall_back_when_indivisible():
    sizes = {"data": 2, "model": 4}
    spec = sharding.spec_for
    base = "model/decoder/layers/FlaxBartDecoderLayers"
    # scanned q projection: the leading layer axis is never split, the output dim is
    assert spec(f"{base}/FlaxBartAttention_0/q_proj/kernel", (12, 1024, 1024), sizes) == P(None, None, MODEL)
    assert spec(f"{base}/FlaxBartAttention_1/out_proj/kernel", (12, 1024, 1024), sizes) == P(None, MODEL, None)
    # mini's GLU width 2730 is not divisible by 4: fall back to the input dim
    assert spec(f"{base}/GLU_0/Dense_0/kernel", (12, 1024, 2730), sizes) == P(None, MODEL, None)
    assert spec(f"{base}/GLU_0/Dense_2/kernel", (12, 2730, 1024), sizes) == P(None, None, MODEL)
    # mini's lm_head has 16385 outputs (odd): split d_model instead
    assert spec("lm_head/kernel", (1024, 16385), sizes) == P(MODEL, None)
    # unscanned layout, mega sizes: vocabulary axis splits
    assert spec("lm_head/kernel", (2048, 16416), {"data": 1, "model": 8}) == P(None, MODEL)
    assert spec("model/encoder/embed_tokens/embedding", (50264, 1024), sizes) == P(MODEL, None)
    # layer norms are replicated; an indivisible everything is replicated
    assert spec(f"{base}/LayerNorm_1/scale", (12, 1024), sizes) == P()
    assert spec(f"{base}/GLU_0/Dense_0/kernel", (7, 683), sizes) == P()


def test_initialize_distributed_is_a_no_op_without_a_coordinator(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert sharding.initialize_distributed() is False
    with pytest.raises(ValueError):
        sharding.make_mesh(model_parallel=len(jax.devices()) + 1)


def test_shard_params_on_eight_cpu_devices():
    code = textwrap.dedent(
        """
        import json, jax, numpy as np
        from engine import sharding
        mesh = sharding.make_mesh(model_parallel=4)
        params = {"model": {"decoder": {"layers": {"FlaxBartDecoderLayers": {
            "FlaxBartAttention_0": {"q_proj": {"kernel": np.ones((2, 16, 16), np.float32)}},
            "GLU_0": {"Dense_0": {"kernel": np.ones((2, 16, 6), np.float32)}},
            "LayerNorm_0": {"bias": np.zeros((2, 16), np.float32)}}}}},
            "lm_head": {"kernel": np.arange(16 * 12, dtype=np.float32).reshape(16, 12)}}
        placed = sharding.shard_params(params, mesh)
        layers = placed["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
        q = layers["FlaxBartAttention_0"]["q_proj"]["kernel"]
        out = {
            "mesh": dict(mesh.shape),
            "q": str(q.sharding.spec),
            "q_shard": list(q.addressable_shards[0].data.shape),
            "glu": str(layers["GLU_0"]["Dense_0"]["kernel"].sharding.spec),
            "ln": str(layers["LayerNorm_0"]["bias"].sharding.spec),
            "lm_equal": bool(np.array_equal(np.asarray(placed["lm_head"]["kernel"]), params["lm_head"]["kernel"])),
        }
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 2, "model": 4}
    assert out["q"] == str(P(None, None, MODEL))
    assert out["q_shard"] == [2, 16, 4]
    # GLU width 6 does not divide by 4: split the input dim (16) instead
    assert out["glu"] == str(P(None, MODEL, None))
    assert out["ln"] == str(P())
    assert out["lm_equal"]
