"""The web page's settings (WEB_*), read apart from the bot's: the page runs in the bot process or on its own."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
KEY_FILE = "web_secret.key"


class WebConfigError(ValueError):
    pass


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    base_url: str = DEFAULT_BASE_URL
    secret_key: str = field(default="", repr=False)
    session_hours: float = 12.0
    oauth_client_id: str | None = None
    oauth_client_secret: str | None = field(default=None, repr=False)
    role_cache_s: float = 300.0  # a Discord sign-in's roles are read again after this long

    @property
    def secure_cookies(self) -> bool:
        """Cookies only over HTTPS when the page is reached through HTTPS (a TLS proxy in front of it)."""
        return self.base_url.startswith("https://")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def data_dir(database_url: str) -> Path:
    """Where the local secret key lives: beside a SQLite database, else ./data."""
    if database_url.startswith("sqlite") and ":///" in database_url:
        return Path(database_url.split(":///", 1)[1]).resolve().parent
    return Path("data").resolve()


def load_key(directory: Path) -> str:
    """The kept local key (made on first use, readable by this user only)."""
    path = directory / KEY_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    directory.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    return key


def web_env() -> dict[str, str]:
    """The environment over ./.env, as the bot's own settings read it (WEB_* may live in either)."""
    from dotenv import dotenv_values

    found = dotenv_values(".env") if Path(".env").is_file() else {}
    return {**{k: v for k, v in found.items() if v is not None}, **os.environ}


def base_url_of(env: Mapping[str, str]) -> str:
    """Where links point (WEB_BASE_URL; checked by ``load_web_config``)."""
    return (env.get("WEB_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def load_web_config(database_url: str, *, host: str | None = None, port: int | None = None,
                    env: Mapping[str, str] | None = None) -> WebConfig:
    """WEB_BASE_URL, WEB_SECRET_KEY (required off loopback; else kept in the data directory), WEB_SESSION_HOURS,
    WEB_OAUTH_CLIENT_ID/SECRET. Raises WebConfigError with one line to show."""
    if env is None:
        env = web_env()
    host = host or env.get("WEB_HOST") or "127.0.0.1"
    if port is None:
        raw = env.get("WEB_PORT") or "8080"
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            raise WebConfigError(f"WEB_PORT must be a port number (1-65535); got {raw!r}")
        port = int(raw)
    base_url = base_url_of(env)
    if urlsplit(base_url).scheme not in ("http", "https") or not urlsplit(base_url).hostname:
        raise WebConfigError(f"WEB_BASE_URL must be an http(s) URL; got {base_url!r}")
    key = env.get("WEB_SECRET_KEY") or ""
    if key and len(key) < 32:
        raise WebConfigError("WEB_SECRET_KEY must be at least 32 characters (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(48))')")
    if not key:
        if not is_loopback(host):
            raise WebConfigError(f"WEB_SECRET_KEY is required when the page listens on {host} (not loopback)")
        key = load_key(data_dir(database_url))
    hours = env.get("WEB_SESSION_HOURS") or "12"
    try:
        session_hours = float(hours)
    except ValueError:
        session_hours = -1
    if not 0 < session_hours <= 24 * 30:
        raise WebConfigError(f"WEB_SESSION_HOURS must be between 0 and 720; got {hours!r}")
    config = WebConfig(host=host, port=port, base_url=base_url, secret_key=key, session_hours=session_hours,
                     oauth_client_id=env.get("WEB_OAUTH_CLIENT_ID") or None,
                     oauth_client_secret=env.get("WEB_OAUTH_CLIENT_SECRET") or None)
    if bool(config.oauth_client_id) != bool(config.oauth_client_secret):
        raise WebConfigError("WEB_OAUTH_CLIENT_ID and WEB_OAUTH_CLIENT_SECRET go together (Discord sign-in)")
    return config
