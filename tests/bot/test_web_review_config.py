"""The web page's settings and command line: the session key (kept beside the SQLite file for local use, required
off loopback), bad values as one line and exit 2, and ``python -m bot web`` serving /healthz until SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bot.web.config import WebConfigError, load_web_config

ROOT = Path(__file__).resolve().parents[2]


def test_web_review_config_key_kept_locally_and_required_off_loopback(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'dalle.db'}"
    first = load_web_config(url, env={})
    key_file = tmp_path / "db" / "web_secret.key"
    assert len(first.secret_key) >= 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_web_config(url, env={}).secret_key == first.secret_key  # kept: sessions survive a restart
    assert first.base_url == "http://127.0.0.1:8080" and not first.secure_cookies
    with pytest.raises(WebConfigError, match="WEB_SECRET_KEY is required"):
        load_web_config(url, host="0.0.0.0", env={})
    assert load_web_config(url, host="0.0.0.0", env={"WEB_SECRET_KEY": "x" * 40}).host == "0.0.0.0"
    assert load_web_config(url, env={"WEB_BASE_URL": "https://mod.example/"}).secure_cookies
    for env, message in (({"WEB_SECRET_KEY": "short"}, "at least 32"), ({"WEB_PORT": "http"}, "WEB_PORT"),
                         ({"WEB_BASE_URL": "ftp://x"}, "WEB_BASE_URL"), ({"WEB_SESSION_HOURS": "0"}, "SESSION"),
                         ({"WEB_OAUTH_CLIENT_ID": "1"}, "go together")):
        with pytest.raises(WebConfigError, match=message):
            load_web_config(url, env=env)


def _child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_", "WEB_"))}
    env.update({"PYTHONPATH": str(ROOT), "DALLE_MODE": "local", "DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}",
                **extra})
    return env


def test_web_review_cli_bad_setting_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bot", "web", "--host", "0.0.0.0"], cwd=tmp_path,
                         env=_child_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "config error: WEB_SECRET_KEY is required when the page listens on 0.0.0.0 (not loopback)")


def test_web_review_cli_serves_healthz_until_sigterm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "bot", "web", "--port", str(port)], cwd=tmp_path,
                             env=_child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200 and r.read() == b'{"ok": true}'
                    break
            except OSError:
                assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-2000:]
                time.sleep(0.3)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
