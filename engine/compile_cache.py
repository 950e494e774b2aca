"""XLA's persistent compilation cache: a restarted engine reuses the programs it compiled last time.

Compiling the sampler is the slowest part of starting: 60–100 s for Mega on one H200 GPU, and on the 2-core CPU
most of the demo model's first request (7.5 s, 2.9 s with a warm cache; ``bench/RESULTS.md``, "Cold start"). JAX
can keep compiled executables on disk keyed by the program, the compiler version and its flags, so a cache is
only ever reused for the same program on the same software; a stale entry is never loaded.

``XLA_CACHE_DIR`` (bot setting; ``python -m engine serve|generate --xla-cache-dir``): a directory, ``off`` to
disable, or unset for the default, the user's cache directory (``~/.cache/dalle-bot/xla`` on Linux). A cache that
cannot be created is logged and skipped: it never stops the engine from starting. It holds at most 4 GiB (least
recently used entries go first). ``JAX_COMPILATION_CACHE_DIR``, JAX's own variable, wins when it is set (even
over ``off``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import platformdirs

log = logging.getLogger(__name__)

SETTING = "XLA_CACHE_DIR"
OFF = frozenset({"off", "none", "false", "0", "no"})
DEFAULT_DIR = platformdirs.user_cache_path("dalle-bot") / "xla"
# least recently used entries are evicted beyond this; with a limit set JAX also takes a file lock around each
# write, so engines sharing the directory never read an entry another one is still writing
MAX_BYTES = 4 * 2**30


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--xla-cache-dir`` for the commands that compile the model (``engine serve``, ``engine generate``)."""
    parser.add_argument("--xla-cache-dir", default=None,
                        help="XLA's persistent compilation cache: a directory, or 'off' (default: env XLA_CACHE_DIR, "
                        "else the user cache directory, ~/.cache/dalle-bot/xla on Linux)")


def resolve(value: str | os.PathLike[str] | None) -> Path | None:
    """A setting's value -> the cache directory, or None when caching is off (unset/empty: the default)."""
    if value is None or not str(value).strip():
        return DEFAULT_DIR
    text = str(value).strip()
    if text.lower() in OFF:
        return None
    return Path(text).expanduser().resolve()


def configure(value: str | os.PathLike[str] | None = None) -> Path | None:
    """What the entry points call: ``value`` (a command-line option or setting; None falls back to the
    ``XLA_CACHE_DIR`` environment variable, then to the default) resolved and enabled."""
    if value is None or not str(value).strip():
        value = os.environ.get(SETTING)
    return enable(resolve(value))


def enable(directory: str | os.PathLike[str] | None) -> Path | None:
    """Point JAX's persistent compilation cache at ``directory`` (None: off). Call before the first compile.

    Every program is cached whatever its compile time (JAX's default skips those under a second, which left the
    demo's encoder and state programs out). Returns the directory in use, or None.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])  # the user's own JAX setting: JAX already reads it
    if directory is None:
        return None
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        log.warning("compilation cache disabled: cannot use %s (%s)", path, exc)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    log.info("compilation cache: %s", path)
    return path
