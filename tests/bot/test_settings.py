"""Settings: defaults, validation with one clear line naming the variable, secrets kept out of output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import DEMO_CHECKPOINT_DIR, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GhIjKl.secret-discord-token-value"


def load(**env: str) -> Settings:
    return load_settings(env, dotenv_path=None)


def test_defaults_local_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load()
    assert s.mode == "local" and s.discord_token is None
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'dalle.db'}"
    assert s.auto_migrate is True and s.sync_commands is True
    assert s.engine_mode == "inprocess" and s.engine_urls == ()
    assert s.checkpoint_dir == DEMO_CHECKPOINT_DIR
    assert s.output_dir == tmp_path.resolve() / "outputs"
    assert s.default_images == 9 and s.flagged_mode == "spoiler" and s.log_level == "INFO"
    assert s.engine_concurrency == 16
    assert s.redis_url is None and s.review_channel_id is None and s.discord_api_base is None


def test_unwritable_data_dir_falls_back_to_user_data_dir(tmp_path, monkeypatch):
    (tmp_path / "data").write_text("a file where the data dir should be")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    s = load()
    assert s.database_url.startswith("sqlite:///") and "dalle-bot" in s.database_url
    assert str(tmp_path / "xdg") in s.database_url


def test_engine_dtype():
    assert load().engine_dtype == "float32"
    assert load(ENGINE_DTYPE="BFloat16").engine_dtype == "bfloat16"


def test_engine_native_attention_is_auto_unless_set():
    assert load().engine_native_attention is None  # the sampler's default: native on CPU in float32
    assert load(ENGINE_NATIVE_ATTENTION="auto").engine_native_attention is None
    assert load(ENGINE_NATIVE_ATTENTION="false").engine_native_attention is False
    assert load(ENGINE_NATIVE_ATTENTION="ON").engine_native_attention is True


def test_engine_model_nice():
    assert load().engine_model_nice == 5
    assert load(ENGINE_MODEL_NICE="0").engine_model_nice == 0


def test_full_configuration():
    s = load(
        DISCORD_TOKEN=TOKEN,
        DISCORD_GUILD_IDS="123, 456",
        SYNC_COMMANDS="no",
        DATABASE_URL="postgresql://bot:pw@127.0.0.1:5432/dalle",
        REDIS_URL="redis://:redispw@127.0.0.1:6379/0",
        ENGINE_MODE="http",
        ENGINE_URLS="http://10.0.0.5:8000/, https://gpu2.example:8443",
        ENGINE_TOKEN="engine-secret",
        DEFAULT_IMAGES="4",
        ENGINE_CONCURRENCY="64",
        RATE_LIMIT_USER="2/minute;20/day",
        RATE_LIMIT_GUILD="100 per hour",
        DAILY_QUOTA="0",
        MAX_QUEUE_PER_USER="3",
        MAX_QUEUE_TOTAL="500",
        REVIEW_CHANNEL_ID="987654321098765432",
        FLAGGED_MODE="WITHHOLD",
        LOG_LEVEL="debug",
        DISCORD_API_BASE="http://127.0.0.1:9999/api/v10",
        DISCORD_GATEWAY_URL="ws://[::1]:9998",
    )
    assert s.mode == "discord" and s.discord_token == TOKEN
    assert s.discord_guild_ids == (123, 456) and s.sync_commands is False
    assert s.auto_migrate is False  # PostgreSQL: migrations are an explicit step by default
    assert s.engine_urls == ("http://10.0.0.5:8000", "https://gpu2.example:8443")
    assert s.engine_url == "http://10.0.0.5:8000"
    assert load(ENGINE_URLS="http://h:1").engine_url is None  # listed but ENGINE_MODE=inprocess
    assert (s.default_images, s.daily_quota, s.max_queue_per_user, s.max_queue_total) == (4, 0, 3, 500)
    assert s.rate_limit_user == "2/minute;20/day" and s.review_channel_id == 987654321098765432
    assert s.flagged_mode == "withhold" and s.log_level == "DEBUG" and s.engine_concurrency == 64
    assert s.discord_gateway_url == "ws://[::1]:9998"


def test_mode_resolution():
    assert load(DISCORD_TOKEN=TOKEN).mode == "discord"
    assert load(DISCORD_TOKEN=TOKEN, DALLE_MODE="local").mode == "local"
    assert load(DALLE_MODE="auto").mode == "local"
    assert load(DISCORD_TOKEN="", DALLE_MODE="").mode == "local"  # blanks from a copied .env.example


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"DALLE_MODE": "discord"}, "DISCORD_TOKEN", "required"),
        ({"DALLE_MODE": "cloud"}, "DALLE_MODE", "auto, discord, local"),
        ({"DATABASE_URL": "not-a-url"}, "DATABASE_URL", "not a database URL"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL", "unsupported"),
        ({"DATABASE_URL": "postgresql://u@h"}, "DATABASE_URL", "no database name"),
        ({"DEFAULT_IMAGES": "10"}, "DEFAULT_IMAGES", "between 1 and 9"),
        ({"DEFAULT_IMAGES": "0"}, "DEFAULT_IMAGES", "between 1 and 9"),
        ({"DEFAULT_IMAGES": "nine"}, "DEFAULT_IMAGES", "whole number"),
        ({"DAILY_QUOTA": "-1"}, "DAILY_QUOTA", ">= 0"),
        ({"ENGINE_CONCURRENCY": "0"}, "ENGINE_CONCURRENCY", "between 1 and 256"),
        ({"ENGINE_CONCURRENCY": "257"}, "ENGINE_CONCURRENCY", "between 1 and 256"),
        ({"ENGINE_CONCURRENCY": "many"}, "ENGINE_CONCURRENCY", "whole number"),
        ({"MAX_QUEUE_TOTAL": "0"}, "MAX_QUEUE_TOTAL", ">= 1"),
        ({"RATE_LIMIT_USER": "3 per fortnight"}, "RATE_LIMIT_USER", "rate limit"),
        ({"RATE_LIMIT_GUILD": "lots"}, "RATE_LIMIT_GUILD", "rate limit"),
        ({"SYNC_COMMANDS": "maybe"}, "SYNC_COMMANDS", "true or false"),
        ({"AUTO_MIGRATE": "2"}, "AUTO_MIGRATE", "true or false"),
        ({"ENGINE_NATIVE_ATTENTION": "fast"}, "ENGINE_NATIVE_ATTENTION", "auto, true or false"),
        ({"ENGINE_MODEL_NICE": "20"}, "ENGINE_MODEL_NICE", "between 0 and 19"),
        ({"DISCORD_GUILD_IDS": "123,abc"}, "DISCORD_GUILD_IDS", "'abc'"),
        ({"REVIEW_CHANNEL_ID": "-5"}, "REVIEW_CHANNEL_ID", "between"),
        ({"FLAGGED_MODE": "blur"}, "FLAGGED_MODE", "spoiler, withhold"),
        ({"ENGINE_DTYPE": "int8"}, "ENGINE_DTYPE", "float32, bfloat16, float16"),
        ({"ENGINE_MODE": "http"}, "ENGINE_URLS", "required"),
        ({"ENGINE_URLS": "ftp://x"}, "ENGINE_URLS", "http/https"),
        ({"ENGINE_URLS": "http://h:99999"}, "ENGINE_URLS", "port"),
        ({"CHECKPOINT_DIR": "/no/such/dir"}, "CHECKPOINT_DIR", "not a directory"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", "INFO"),
        ({"REDIS_URL": "http://h"}, "REDIS_URL", "redis://"),
        ({"REDIS_URL": "redis://h:abc/0"}, "REDIS_URL", "redis://"),
        ({"DATABASE_URL": "sqlite://"}, "DATABASE_URL", "in-memory"),
        ({"DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL", "in-memory"),
        ({"DISCORD_API_BASE": "https://discord.com/api/v10"}, "DISCORD_API_BASE", "127.0.0.1"),
        ({"DISCORD_API_BASE": "http://127.0.0.1.evil.example/api"}, "DISCORD_API_BASE", "127.0.0.1"),
        ({"DISCORD_GATEWAY_URL": "wss://gateway.discord.gg"}, "DISCORD_GATEWAY_URL", "localhost"),
        ({"DISCORD_TOKEN": "abc def"}, "DISCORD_TOKEN", "whitespace"),
    ],
)
def test_bad_settings_name_the_variable(env, variable, fragment):
    with pytest.raises(SettingsError) as info:
        load(**env)
    message = str(info.value)
    assert message.startswith(f"{variable}: ") and info.value.variable == variable
    assert fragment in message
    assert "\n" not in message


def test_secrets_never_shown():
    s = load(
        DISCORD_TOKEN=TOKEN,
        ENGINE_TOKEN="engine-secret-xyz",
        DATABASE_URL="postgresql://bot:db-pass-123@127.0.0.1/dalle",
        REDIS_URL="redis://user:redis-pass-456@127.0.0.1:6379/0",
    )
    for text in (repr(s), str(s), f"{s}", repr(s.redacted())):
        for secret in (TOKEN, "engine-secret-xyz", "db-pass-123", "redis-pass-456"):
            assert secret not in text
    assert "127.0.0.1" in repr(s) and "dalle" in repr(s)  # the non-secret parts stay useful
    with pytest.raises(SettingsError) as info:
        load(DATABASE_URL="mysql://bot:db-pass-123@h/x")
    assert "db-pass-123" not in str(info.value)
    with pytest.raises(SettingsError) as info:
        load(REDIS_URL="http://u:redis-pass-456@h")
    assert "redis-pass-456" not in str(info.value)


def test_settings_are_frozen():
    s = load()
    with pytest.raises(AttributeError):
        s.default_images = 3  # type: ignore[misc]


def test_dotenv_file_and_environment_precedence(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("DEFAULT_IMAGES=4\nFLAGGED_MODE=withhold\n# comment\nLOG_LEVEL=\n")
    s = load_settings({"DEFAULT_IMAGES": "6"}, dotenv_path=dotenv)
    assert s.default_images == 6 and s.flagged_mode == "withhold" and s.log_level == "INFO"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLAGGED_MODE", "spoiler")
    monkeypatch.delenv("DEFAULT_IMAGES", raising=False)
    s = load_settings()  # os.environ over ./.env
    assert s.default_images == 4 and s.flagged_mode == "spoiler"
    assert load_settings({}).default_images == 9  # an explicit env ignores ./.env unless asked


def test_env_example_documents_every_setting():
    """Every variable load_settings reads is in .env.example, commented, and the file itself loads."""
    source = (ROOT / "bot" / "config.py").read_text()
    import re

    read = set(re.findall(r'"([A-Z][A-Z_]{3,})"', source)) - {"INFO", "DEBUG", "WARNING", "ERROR", "CRITICAL"}
    example = (ROOT / ".env.example").read_text()
    for name in read:
        assert re.search(rf"^#?\s*{name}=", example, re.M), f"{name} missing from .env.example"
        idx = example.index(f"{name}=")
        assert "#" in example[max(0, idx - 300) : idx], f"{name} has no comment"
    load_settings({}, dotenv_path=ROOT / ".env.example")


def _run_bot(env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_"))}
    env.update({"PYTHONPATH": str(ROOT), **env_extra})
    return subprocess.run([sys.executable, "-m", "bot"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_python_m_bot_bad_setting_is_one_line_exit_2(tmp_path):
    out = _run_bot({"DEFAULT_IMAGES": "12", "DISCORD_TOKEN": TOKEN}, tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["config error: DEFAULT_IMAGES: must be between 1 and 9; got 12"]
    assert TOKEN not in out.stderr

    out = _run_bot({"DALLE_MODE": "discord"}, tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("config error: DISCORD_TOKEN:")
    assert len(out.stderr.strip().splitlines()) == 1


def test_python_m_bot_unmigrated_postgres_style_gate(tmp_path):
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    out = _run_bot({"DATABASE_URL": url, "AUTO_MIGRATE": "false", "LOG_LEVEL": "ERROR"}, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("database error:")
    assert "python -m store upgrade" in out.stderr


def test_python_m_bot_migrates_then_dispatches(tmp_path):
    """Embedded defaults: the SQLite file is migrated, then the local front end starts; without a model it says
    so in one line (no traceback) and exits 2."""
    url = f"sqlite:///{tmp_path / 'run.db'}"
    missing = tmp_path / "empty-checkpoint"
    missing.mkdir()
    out = _run_bot({"DATABASE_URL": url, "LOG_LEVEL": "ERROR", "DALLE_MODE": "local",
                    "CHECKPOINT_DIR": str(missing)}, tmp_path)
    assert "Traceback" not in out.stderr
    assert (tmp_path / "run.db").exists()
    assert out.returncode == 2
    assert str(missing) in out.stderr + out.stdout


def test_python_m_bot_unreachable_database_is_one_line(tmp_path):
    out = _run_bot({"DATABASE_URL": "postgresql://bot:pg-secret-pw@127.0.0.1:1/dalle", "AUTO_MIGRATE": "true",
                    "LOG_LEVEL": "ERROR"}, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("database error: cannot open postgresql://bot:***@127.0.0.1:1")
    assert "pg-secret-pw" not in out.stderr


def test_python_m_bot_preflight_problems_are_one_line(tmp_path):
    """What only shows once the bot runs is checked before it accepts work: each is one line, exit 2."""
    base = {"DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", "LOG_LEVEL": "ERROR", "DALLE_MODE": "local"}
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        ({"OUTPUT_DIR": str(blocker / "out")}, "config error: OUTPUT_DIR: cannot write images to"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "config error: REDIS_URL: Redis does not answer"),
    ]
    for extra, start in cases:
        out = _run_bot({**base, **extra}, tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), out.stderr
    (tmp_path / ".env").write_bytes(b"DEFAULT_IMAGES=\xff\n")
    out = _run_bot(base, tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == "config error: .env: is not UTF-8 text; save it as UTF-8"


def test_a_second_bot_process_on_the_same_sqlite_file_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_"))}
    env.update(PYTHONPATH=str(ROOT), DATABASE_URL=f"sqlite:///{tmp_path / 'shared.db'}", LOG_LEVEL="ERROR",
               OUTPUT_DIR=str(tmp_path / "out"), DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine")
    first = subprocess.Popen([sys.executable, "-m", "bot"], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "local mode" in first.stdout.readline()  # running, waiting at its prompt
        second = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=env, input="", capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2 and "another dalle-bot process is using" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.communicate(input="", timeout=60)
    assert first.returncode == 0
    again = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=env, input="", capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0, again.stderr  # the lock went with the first process


def test_python_m_bot_with_discord_unreachable_is_one_line(tmp_path):
    out = _run_bot({"DISCORD_TOKEN": TOKEN, "DISCORD_API_BASE": "http://127.0.0.1:1/api/v10", "LOG_LEVEL": "CRITICAL",
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}",
                    "DALLE_ENGINE_FACTORY": "tests.fakes.engine:inprocess_fake_engine"}, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot reach Discord")
    assert TOKEN not in out.stderr
