"""XLA's persistent compilation cache: settings, a cache that cannot be made, and a restart that reuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.config import load_settings
from engine import compile_cache

ROOT = Path(__file__).resolve().parents[2]


def test_resolve_default_off_and_paths(tmp_path, monkeypatch):
    assert compile_cache.resolve(None) == compile_cache.DEFAULT_DIR
    assert compile_cache.resolve("  ") == compile_cache.DEFAULT_DIR
    for off in ("off", "OFF", "none", "false", "0"):
        assert compile_cache.resolve(off) is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.resolve("~/xla") == tmp_path / "xla"
    assert compile_cache.resolve(str(tmp_path / "c")) == tmp_path / "c"


def test_a_cache_that_cannot_be_made_is_skipped_not_fatal(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING", logger="engine.compile_cache"):
        assert compile_cache.enable(blocker / "xla") is None
    assert "compilation cache disabled" in caplog.text
    assert compile_cache.enable(None) is None  # off
    monkeypatch.setenv("XLA_CACHE_DIR", "off")
    assert compile_cache.configure(None) is None  # the environment is the fallback


def test_bot_setting_is_read_as_given():
    assert load_settings({}, dotenv_path=None).xla_cache_dir is None
    assert load_settings({"XLA_CACHE_DIR": "off"}, dotenv_path=None).xla_cache_dir == "off"
    assert load_settings({"XLA_CACHE_DIR": "/var/cache/x"}, dotenv_path=None).xla_cache_dir == "/var/cache/x"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_CACHE_DIR")}
    return dict(env, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from training.fixtures import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", with_clip=False)


GENERATE = """
import collections, json, sys
import jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
from engine.__main__ import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "hits": events["/jax/compilation_cache/cache_hits"],
                  "requests": events["/jax/compilation_cache/compile_requests_use_cache"],
                  "written": events["/jax/compilation_cache/cache_misses"]}))  # JAX counts a miss when it writes
"""


def test_a_second_run_loads_every_program_from_the_cache(checkpoint, tmp_path):
    cache = tmp_path / "xla"

    def generate(out: str) -> tuple[dict, dict]:
        args = ["generate", "a red circle", "--n", "2", "--seed", "3", "--checkpoint", str(checkpoint),
                "--out", str(tmp_path / out), "--xla-cache-dir", str(cache)]
        proc = subprocess.run([sys.executable, "-c", GENERATE, *args], capture_output=True, text=True, env=_env(),
                              cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = json.loads(proc.stdout.strip().splitlines()[-1])
        assert counts["rc"] == 0
        return counts, json.loads((tmp_path / out / "result.json").read_text())

    cold, first = generate("first")
    assert cold["hits"] == 0 and cold["requests"] > 0
    assert cold["written"] == cold["requests"]  # every compiled program was written, however fast it compiled
    entries = sorted(p.name for p in cache.glob("*-cache"))  # (beside them, JAX's access times for eviction)
    assert len(entries) == cold["written"]
    warm, second = generate("second")
    assert warm["hits"] == warm["requests"] == cold["requests"] and warm["written"] == 0  # a restart compiles nothing
    assert sorted(p.name for p in cache.glob("*-cache")) == entries
    # the cached executables compute what the freshly compiled ones did
    assert [im["clip_score"] for im in second["images"]] == [im["clip_score"] for im in first["images"]]
    for a, b in zip(first["images"], second["images"], strict=True):
        assert (tmp_path / "first" / a["file"]).read_bytes() == (tmp_path / "second" / b["file"]).read_bytes()


def test_the_bot_in_process_engine_turns_the_cache_on(checkpoint, tmp_path):
    code = textwrap.dedent(f"""
        import os, jax
        from pathlib import Path
        from bot.config import Settings
        from bot.wiring import engine_from_settings
        from engine.api import GenerationRequest
        s = Settings(mode="local", engine_mode="inprocess", checkpoint_dir=Path({str(checkpoint)!r}),
                     xla_cache_dir={str(tmp_path / "bot-xla")!r}, engine_warmup=False)
        engine = engine_from_settings(s, warmup=False)
        count = lambda: sum(name.endswith("-cache") for name in os.listdir({str(tmp_path / "bot-xla")!r}))
        before = count()
        engine.batcher.pipeline.generate([GenerationRequest("a red circle", n=1)])  # compiles the sampler
        print(count() - before)
        print(jax.config.jax_compilation_cache_dir)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, written, directory = proc.stdout.strip().splitlines()
    assert directory == str(tmp_path / "bot-xla") and int(written) > 0
