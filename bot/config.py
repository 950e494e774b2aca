"""Settings from the environment and ``.env``, validated once at start-up.

Every problem is a :class:`SettingsError` whose message is one line that starts with the variable's name,
so ``python -m bot`` can print ``config error: <message>`` and exit 2 without a traceback. Secret values
(DISCORD_TOKEN, ENGINE_TOKEN, passwords in DATABASE_URL / REDIS_URL) never appear in messages, ``repr`` or
``str``. The variables and their defaults are documented in ``.env.example``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from bot.outcome import MAX_IMAGES
from engine.client import DEFAULT_MODEL_NICE
from store.db import DatabaseURLError, default_sqlite_url, is_secret_key, parse_url, redact_url, url_secrets

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT_DIR = REPO_ROOT / "engine" / "assets" / "demo"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECRET_FIELDS = frozenset({"discord_token", "engine_token"})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_USE_DEFAULT_DOTENV = object()


class SettingsError(ValueError):
    """A setting is missing or invalid. ``variable`` names it; ``str(err)`` is one line starting with it."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


@dataclass(frozen=True, repr=False)
class Settings:
    """The bot's validated configuration (see ``.env.example`` for each variable)."""

    mode: Literal["discord", "local"]  # DALLE_MODE after resolving "auto"
    discord_token: str | None = field(default=None, compare=False)
    discord_guild_ids: tuple[int, ...] = ()
    sync_commands: bool = True
    database_url: str = "sqlite:///data/dalle.db"
    auto_migrate: bool = True
    redis_url: str | None = None
    engine_mode: Literal["inprocess", "http"] = "inprocess"
    engine_urls: tuple[str, ...] = ()
    engine_token: str | None = field(default=None, compare=False)
    checkpoint_dir: Path = DEMO_CHECKPOINT_DIR
    engine_concurrency: int = 16  # jobs in the engine at once: enough to fill a batched pass
    engine_stall_timeout: int = 600
    engine_warmup: bool = True
    engine_native_attention: bool | None = None  # None: the sampler's default (native on CPU in float32)
    engine_model_nice: int = DEFAULT_MODEL_NICE  # the in-process model threads run below the loop (engine.priority)
    engine_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    xla_cache_dir: str | None = None  # XLA_CACHE_DIR as given (engine.compile_cache: None = its default, "off")
    output_dir: Path = Path("outputs")
    default_images: int = MAX_IMAGES
    rate_limit_user: str = "3/minute"
    rate_limit_guild: str = "30/minute"
    daily_quota: int = 50
    max_queue_per_user: int = 2
    max_queue_total: int = 100
    job_lease_seconds: int = 60  # on a shared database: how soon a dead process's jobs are taken over
    review_channel_id: int | None = None
    flagged_mode: Literal["spoiler", "withhold"] = "spoiler"
    case_reping_hours: int = 24  # re-ping open cases older than this once (a guild's reping_hours wins; 0: never)
    case_upkeep_seconds: int = 300  # how often open cases are checked for a re-ping
    log_level: str = "INFO"
    shard_count: int | None = None  # None: discord.py asks Discord how many shards and runs them all here
    shard_ids: tuple[int, ...] | None = None  # this process's shards (None: all of shard_count)
    metrics_port: int | None = None  # serve GET /metrics here (None: no endpoint)
    metrics_host: str = "127.0.0.1"
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None

    @property
    def engine_url(self) -> str | None:
        """The first engine service URL when ENGINE_MODE=http, else None (callers that drive one service)."""
        return self.engine_urls[0] if self.engine_mode == "http" and self.engine_urls else None

    def redacted(self) -> dict[str, Any]:
        """All fields with secrets masked: safe to log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "***" if value else None
            elif f.name in ("database_url", "redis_url") and value:
                value = redact_url(value) if f.name == "database_url" else _redact_generic_url(value)
            elif f.name == "engine_urls":
                value = tuple(_redact_generic_url(u) for u in value)
            out[f.name] = value
        return out

    def secrets(self) -> list[str]:
        """Every secret value the settings hold (tokens, URL passwords and secret query values): what a log
        must never show (``bot.logsafe``)."""
        found = [self.discord_token, self.engine_token, *url_secrets(self.database_url)]
        for url in (self.redis_url, *self.engine_urls):
            found += _generic_url_secrets(url) if url else []
        return [v for v in found if v]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({inner})"

    __str__ = __repr__


def _redact_generic_url(url: str) -> str:
    """A Redis or engine URL with its password and secret query values (``?password=``, ``token``) masked."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if parts.query:
        query = [(k, "***" if is_secret_key(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


def _generic_url_secrets(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    return found + [v for k, v in parse_qsl(parts.query) if is_secret_key(k) and v]


# --- parsing helpers: each raises SettingsError naming the variable ----------------------------------------


class _Env:
    def __init__(self, values: Mapping[str, str]) -> None:
        # empty values count as unset, so a copied .env.example with blanks behaves like the defaults
        self.values = {k: v.strip() for k, v in values.items() if v is not None and v.strip() != ""}

    def str(self, name: str, default: str | None = None) -> str | None:
        return self.values.get(name, default)

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        raw = self.values.get(name, default).lower()
        if raw not in allowed:
            raise SettingsError(name, f"must be one of {', '.join(allowed)}; got {self.values[name]!r}")
        return raw

    def bool(self, name: str, default: bool) -> bool:
        raw = self.values.get(name)
        return default if raw is None else self._truth(name, raw, "true or false")

    def auto_bool(self, name: str) -> bool | None:
        """true / false, or None where unset or "auto" (the component chooses)."""
        raw = self.values.get(name)
        return None if raw is None or raw.lower() == "auto" else self._truth(name, raw, "auto, true or false")

    @staticmethod
    def _truth(name: str, raw: str, accepted: str) -> bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(name, f"must be {accepted} (also 1/0, yes/no, on/off); got {raw!r}")

    def int(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        raw = self.values.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, f"must be a whole number; got {raw!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                raise SettingsError(name, f"must be >= {lo}; got {value}")
            raise SettingsError(name, f"must be between {lo} and {hi}; got {value}")
        return value

    def snowflake(self, name: str) -> int | None:
        return self.int(name, None, 1, 2**63 - 1)

    def snowflakes(self, name: str) -> tuple[int, ...]:
        raw = self.values.get(name)
        if raw is None:
            return ()
        ids = []
        for part in raw.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not (0 < int(part) < 2**63):
                raise SettingsError(name, f"must be a comma-separated list of Discord ids; {part!r} is not one")
            ids.append(int(part))
        return tuple(ids)

    def int_list(self, name: str, lo: int, hi: int) -> tuple[int, ...]:
        """A comma-separated list of distinct whole numbers between ``lo`` and ``hi``."""
        values: list[int] = []
        for part in (p.strip() for p in self.values[name].split(",")):
            if not part.isdigit() or not lo <= int(part) <= hi:
                raise SettingsError(name, f"must be a comma-separated list of numbers from {lo} to {hi}; "
                                          f"{part!r} is not one")
            if int(part) in values:
                raise SettingsError(name, f"lists {part} twice")
            values.append(int(part))
        return tuple(values)

    def secret(self, name: str) -> str | None:
        raw = self.values.get(name)
        if raw is not None and any(ch.isspace() for ch in raw):
            raise SettingsError(name, "contains whitespace (value not shown)")
        return raw

    def rate_limit(self, name: str, default: str) -> str:
        raw = self.values.get(name, default)
        from limits import parse_many

        try:
            parse_many(raw)
        except ValueError as exc:
            raise SettingsError(name, f"not a rate limit like '3/minute' or '10 per hour; 100/day': {exc}") from None
        return raw

    def http_url(self, name: str, value: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise SettingsError(name, f"{value!r} has an invalid port") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise SettingsError(name, f"must be a {'/'.join(schemes)} URL with a host; got {value!r}")
        return value

    def loopback_url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        raw = self.values.get(name)
        if raw is None:
            return None
        self.http_url(name, raw, schemes)
        host = urlsplit(raw).hostname
        if host not in LOOPBACK_HOSTS:
            raise SettingsError(
                name, f"is a test-only override and must point to 127.0.0.1, localhost or ::1; got host {host!r}"
            )
        return raw

    def path(self, name: str, default: Path) -> Path:
        raw = self.values.get(name)
        return Path(raw).expanduser().resolve() if raw is not None else default


def _environment(env: Mapping[str, str] | None, dotenv_path: Any) -> dict[str, str]:
    from dotenv import dotenv_values

    if dotenv_path is _USE_DEFAULT_DOTENV:
        dotenv_path = ".env" if env is None else None
    values: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        try:
            found = dotenv_values(dotenv_path)
        except UnicodeDecodeError:
            raise SettingsError(str(dotenv_path), "is not UTF-8 text; save it as UTF-8") from None
        values.update({k: v for k, v in found.items() if v is not None})
    values.update(os.environ if env is None else env)  # the real environment wins over .env
    return values


def load_settings(
    env: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None | Any = _USE_DEFAULT_DOTENV
) -> Settings:
    """Read and validate settings.

    ``env=None``: ``os.environ`` over ``./.env`` (or ``dotenv_path``). An explicit ``env`` mapping is used
    alone unless a ``dotenv_path`` is given too. Raises :class:`SettingsError` on the first bad value.
    """
    e = _Env(_environment(env, dotenv_path))

    token = e.secret("DISCORD_TOKEN")
    requested = e.choice("DALLE_MODE", ("auto", "discord", "local"), "auto")
    if requested == "discord" and not token:
        raise SettingsError("DISCORD_TOKEN", "is required when DALLE_MODE=discord (or set DALLE_MODE=local)")
    mode = "local" if requested == "local" or (requested == "auto" and not token) else "discord"

    raw_db = e.str("DATABASE_URL")
    database_url = raw_db if raw_db is not None else default_sqlite_url()
    try:
        parsed_db = parse_url(database_url)
    except DatabaseURLError as exc:
        raise SettingsError("DATABASE_URL", str(exc)) from None
    is_sqlite = parsed_db.get_backend_name() == "sqlite"
    if is_sqlite and (parsed_db.database or ":memory:") == ":memory:":
        raise SettingsError("DATABASE_URL", "an in-memory SQLite database would lose every job and is not shared "
                                            "with the migrations; give a file, e.g. sqlite:///data/dalle.db")

    redis_url = e.str("REDIS_URL")
    if redis_url is not None:
        parts = urlsplit(redis_url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
            well_formed = parts.scheme in ("redis", "rediss", "unix") and (parts.scheme == "unix" or parts.hostname)
        except ValueError:
            well_formed = False
        if not well_formed:
            raise SettingsError("REDIS_URL", "must look like redis://host:6379/0 (value not shown: may hold secrets)")

    engine_mode = e.choice("ENGINE_MODE", ("inprocess", "http"), "inprocess")
    engine_urls = tuple(
        e.http_url("ENGINE_URLS", u.strip().rstrip("/"))
        for u in (e.str("ENGINE_URLS") or "").split(",")
        if u.strip()
    )
    if engine_mode == "http" and not engine_urls:
        raise SettingsError("ENGINE_URLS", "is required when ENGINE_MODE=http (comma-separated http(s) URLs)")

    checkpoint_dir = e.path("CHECKPOINT_DIR", DEMO_CHECKPOINT_DIR)
    if e.str("CHECKPOINT_DIR") is not None and engine_mode == "inprocess" and not checkpoint_dir.is_dir():
        raise SettingsError("CHECKPOINT_DIR", f"{str(checkpoint_dir)!r} is not a directory")

    log_level = e.str("LOG_LEVEL", "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise SettingsError("LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}; got {e.str('LOG_LEVEL')!r}")

    shard_count = e.int("SHARD_COUNT", None, 1, 65_536)
    shard_ids = None
    if e.str("SHARD_IDS") is not None:
        if shard_count is None:
            raise SettingsError("SHARD_IDS", "needs SHARD_COUNT (how many shards there are in all)")
        shard_ids = e.int_list("SHARD_IDS", 0, shard_count - 1)

    return Settings(
        mode=mode,  # type: ignore[arg-type]
        discord_token=token,
        discord_guild_ids=e.snowflakes("DISCORD_GUILD_IDS"),
        sync_commands=e.bool("SYNC_COMMANDS", True),
        database_url=database_url,
        auto_migrate=e.bool("AUTO_MIGRATE", is_sqlite),
        redis_url=redis_url,
        engine_mode=engine_mode,  # type: ignore[arg-type]
        engine_urls=engine_urls,
        engine_token=e.secret("ENGINE_TOKEN"),
        checkpoint_dir=checkpoint_dir,
        engine_concurrency=e.int("ENGINE_CONCURRENCY", Settings.engine_concurrency, 1, 256),  # type: ignore[arg-type]
        engine_stall_timeout=e.int("ENGINE_STALL_TIMEOUT", Settings.engine_stall_timeout, 0, 86_400),  # type: ignore[arg-type]
        engine_warmup=e.bool("ENGINE_WARMUP", True),
        engine_native_attention=e.auto_bool("ENGINE_NATIVE_ATTENTION"),
        engine_model_nice=e.int("ENGINE_MODEL_NICE", DEFAULT_MODEL_NICE, 0, 19),  # type: ignore[arg-type]
        engine_dtype=e.choice("ENGINE_DTYPE", ("float32", "bfloat16", "float16"), "float32"),  # type: ignore[arg-type]
        xla_cache_dir=e.str("XLA_CACHE_DIR"),
        output_dir=e.path("OUTPUT_DIR", Path("outputs").resolve()),
        default_images=e.int("DEFAULT_IMAGES", MAX_IMAGES, 1, MAX_IMAGES),  # type: ignore[arg-type]
        rate_limit_user=e.rate_limit("RATE_LIMIT_USER", "3/minute"),
        rate_limit_guild=e.rate_limit("RATE_LIMIT_GUILD", "30/minute"),
        daily_quota=e.int("DAILY_QUOTA", 50, 0),  # type: ignore[arg-type]
        max_queue_per_user=e.int("MAX_QUEUE_PER_USER", 2, 1),  # type: ignore[arg-type]
        max_queue_total=e.int("MAX_QUEUE_TOTAL", 100, 1),  # type: ignore[arg-type]
        job_lease_seconds=e.int("JOB_LEASE_SECONDS", 60, 3, 3600),  # type: ignore[arg-type]
        review_channel_id=e.snowflake("REVIEW_CHANNEL_ID"),
        flagged_mode=e.choice("FLAGGED_MODE", ("spoiler", "withhold"), "spoiler"),  # type: ignore[arg-type]
        case_reping_hours=e.int("CASE_REPING_HOURS", Settings.case_reping_hours, 0, 8760),  # type: ignore[arg-type]
        case_upkeep_seconds=e.int("CASE_UPKEEP_SECONDS", Settings.case_upkeep_seconds, 1, 86_400),  # type: ignore[arg-type]
        log_level=log_level,
        shard_count=shard_count,
        shard_ids=shard_ids,
        metrics_port=e.int("METRICS_PORT", None, 1, 65_535),
        metrics_host=e.str("METRICS_HOST", "127.0.0.1"),  # type: ignore[arg-type]
        discord_api_base=e.loopback_url("DISCORD_API_BASE", ("http", "https")),
        discord_gateway_url=e.loopback_url("DISCORD_GATEWAY_URL", ("ws", "wss", "http", "https")),
    )
