"""The model's threads run below the event loop (engine.priority): the batcher's model thread and XLA's pool."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from engine.api import GenerationRequest
from engine.batching import Batcher
from engine.fake import FakePipeline
from engine.priority import lower_model_threads

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
ROOT = Path(__file__).resolve().parents[2]


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class NiceProbe(FakePipeline):
    """A fake pipeline that records the nice value of the thread each pass runs on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.nice_seen: list[int] = []

    def generate(self, *args, **kwargs):
        self.nice_seen.append(_nice())
        return super().generate(*args, **kwargs)


@linux_only
@pytest.mark.parametrize("model_nice", [7, 0])
async def test_the_batchers_model_thread_runs_at_model_nice(model_nice):
    base = _nice()
    probe = NiceProbe(batch_buckets=(1, 2))
    batcher = Batcher(probe, window_ms=0, model_nice=model_nice)
    rid = await batcher.submit(GenerationRequest("a red circle", n=1, seed=1))
    result = await batcher.result(rid, timeout=10)
    assert len(result.images) == 1
    assert probe.nice_seen == [max(base, model_nice)]
    assert _nice() == base  # the event loop's thread keeps its priority
    await batcher.close()


@linux_only
def test_xla_pool_threads_are_lowered_and_never_raised_back(tmp_path):
    """In a fresh process (XLA's pool is process-wide): after one XLA program has run, a thread that runs the model
    lowers itself and XLA's pool threads; a smaller nice value later changes nothing; the main thread is left
    alone."""
    code = textwrap.dedent("""
        import json, os, threading
        import jax.numpy as jnp
        from engine.priority import XLA_POOL_THREAD, lower_model_threads, model_threads, _thread_name

        x = jnp.ones((256, 256))
        (x @ x).block_until_ready()
        out = {}
        def model():
            out["changed"] = lower_model_threads(6)
            out["again"] = lower_model_threads(3)
            out["self"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        t = threading.Thread(target=model)
        t.start()
        t.join()
        pool = [tid for tid in model_threads() if _thread_name(tid) == XLA_POOL_THREAD]
        out["pool"] = [os.getpriority(os.PRIO_PROCESS, tid) for tid in pool]
        out["main"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out["main"]
    assert out["pool"], "XLA:CPU started no intra-op pool threads"
    assert out["self"] == max(base, 6) and all(n == max(base, 6) for n in out["pool"])
    assert out["changed"] == (1 + len(out["pool"]) if base < 6 else 0) and out["again"] == 0


def test_zero_changes_nothing():
    assert lower_model_threads(0) == 0


def test_the_bots_in_process_engine_takes_engine_model_nice_and_native_attention(monkeypatch):
    from pathlib import Path

    import engine.pipeline
    from bot.config import Settings
    from bot.wiring import engine_from_settings

    seen = {}
    monkeypatch.setattr(engine.pipeline, "load_pipeline", lambda path, **opts: seen.update(opts) or FakePipeline())
    s = Settings(mode="local", engine_mode="inprocess", checkpoint_dir=Path("unused"), xla_cache_dir="off",
                 engine_warmup=False, engine_model_nice=9)
    assert engine_from_settings(s).batcher.model_nice == 9
    assert seen["native_attention"] is None  # unset: the sampler's default
    s = Settings(mode="local", engine_mode="inprocess", checkpoint_dir=Path("unused"), xla_cache_dir="off",
                 engine_warmup=False, engine_native_attention=False)
    assert engine_from_settings(s).batcher.model_nice == 5
    assert seen["native_attention"] is False
