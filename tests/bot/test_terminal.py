"""The terminal front end: in-process over StringIO, and as a real subprocess driven through stdin."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from sqlalchemy import select

from bot.config import Settings, load_settings
from bot.terminal import parse_dalle, run
from store.models import Feedback, Generation, Refusal
from store.repository import Repository
from tests.fakes.engine import FakeEngine

ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path) -> Settings:
    return load_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}", "OUTPUT_DIR": str(tmp_path / "outputs"),
                          "RATE_LIMIT_USER": "100 per minute", "DAILY_QUOTA": "0", "DEFAULT_IMAGES": "4",
                          "MAX_QUEUE_PER_USER": "5"}, dotenv_path=None)


async def _rows(url: str, model):
    repo = Repository.from_url(url)
    async with repo.sessions() as s:
        rows = list((await s.execute(select(model))).scalars())
    await repo.close()
    return rows


def test_parse_options():
    assert parse_dalle("a red circle --n 4 --seed 7") == ("a red circle", {"n": 4, "seed": 7})
    assert parse_dalle("--images 2 a cat's hat") == ("a cat's hat", {"n": 2})
    for bad in ("a --n", "a --seed x"):
        try:
            parse_dalle(bad)
        except ValueError as exc:
            assert "--" in str(exc)
        else:
            raise AssertionError(bad)


async def test_local_session_in_process(tmp_path):
    settings = _settings(tmp_path)
    script = "\n".join([
        "/help",
        "/dalle a red circle on a blue background --n 3 --seed 7",
        "/dalle n4ked person",
        "/dalle a cat --n 12",
        "/bogus",
    ]) + "\n"
    out = io.StringIO()
    rc = await run(settings, stdin=io.StringIO(script), out=out, engine=FakeEngine())
    text = out.getvalue()
    assert rc == 0
    assert "/feedback <image-id>" in text
    assert "refused: Sorry, I can't draw that" in text
    assert "refused: images must be between 1 and 9" in text
    assert "unknown command /bogus" in text
    paths = re.findall(r"image (\d+)\s+rank (\d)\s+clip ([0-9.]+)\s+(\S+\.png)", text)
    assert len(paths) == 3
    for _, _, _, p in paths:
        assert Path(p).is_file() and Path(p).is_relative_to(tmp_path / "outputs")
    gens = await _rows(settings.database_url, Generation)
    assert [(g.prompt, g.seed, g.n_images, g.status) for g in gens] == [
        ("a red circle on a blue background", 7, 3, "done")]
    assert len(await _rows(settings.database_url, Refusal)) == 2  # the filter and the invalid size

    # second session on the same database: feedback on an image from the first
    image_id = paths[0][0]
    out2 = io.StringIO()
    other = paths[1][0]
    script2 = (f"/feedback {image_id} up\n/feedback {image_id} report bias too samey\n/feedback {other} down bias\n"
               "/feedback 9999 up\n/queue\n")
    await run(settings, stdin=io.StringIO(script2), out=out2, engine=FakeEngine())
    text2 = out2.getvalue()
    assert "Thanks for the feedback!" in text2 and "a moderator will review" in text2
    assert "error: Image 9999 does not exist." in text2 and "Your queue is empty." in text2
    fb = await _rows(settings.database_url, Feedback)
    assert sorted((f.kind, f.reason, f.note) for f in fb) == [("down", "bias", None), ("report", "bias", "too samey"),
                                                              ("up", None, None)]


def test_python_m_bot_subprocess_over_stdin(tmp_path):
    """``python -m bot`` driven through stdin."""
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'sub.db'}", OUTPUT_DIR=str(tmp_path / "outputs"),
        DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine", PYTHONPATH=os.pathsep.join(
            p for p in [os.environ.get("PYTHONPATH", ""), str(ROOT)] if p),
    )
    proc = subprocess.run([sys.executable, "-m", "bot"], input="/dalle a red circle --n 2 --seed 5\n/queue\n",
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "queued at position 1 (seed 5)" in proc.stdout
    files = re.findall(r"(\S+\.png)", proc.stdout)
    assert len(files) == 2 and all(Path(f).is_file() for f in files)
    assert "Traceback" not in proc.stderr


def _bot_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'sub.db'}", OUTPUT_DIR=str(tmp_path / "outputs"), LOG_LEVEL="ERROR",
        DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine", PYTHONPATH=os.pathsep.join(
            p for p in [os.environ.get("PYTHONPATH", ""), str(ROOT)] if p),
    )
    return env


def test_bad_commands_are_answered_and_the_session_goes_on(tmp_path):
    script = (b"/feedback 99999999999999999999 up\n/feedback \xc2\xb2 up\n/cancel 99999999999999999999\n"
              b"/dalle caf\xe9 au lait --n 1\n/dalle a blue square --private\nhelp\n/dalle a red circle --n 1\n"
              b"quit\n")
    proc = subprocess.run([sys.executable, "-m", "bot"], input=script, capture_output=True, env=_bot_env(tmp_path),
                          cwd=tmp_path, timeout=60)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.count("usage: /feedback") == 2 and "usage: /cancel <id>" in out
    assert "unknown option --private" in out
    assert "done: 1 image(s) for 'caf\ufffd au lait'" in out  # undecodable byte replaced, not a crash
    assert "done: 1 image(s) for 'a red circle'" in out
    assert "for 'help'" not in out and "for 'quit'" not in out  # bare words are commands
    assert "Traceback" not in out + proc.stderr.decode()


def test_ctrl_c_at_the_prompt_quits_at_once(tmp_path):
    # as from an interactive terminal: a test run started in the background (`cmd &` in a non-interactive shell,
    # nohup) ignores SIGINT, and a child inherits that — Python then rightly leaves Ctrl-C ignored
    # (restored in the child itself: a preexec_fn would fork this multithreaded JAX process)
    code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('bot', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_bot_env(tmp_path), cwd=tmp_path)
    try:
        assert "local mode" in proc.stdout.readline().decode()  # waiting at the prompt, stdin open
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        err = proc.stderr.read().decode(errors="replace")
        if "shutdown took more than" in err:  # quit only thanks to the exit deadline: report where it hung
            warnings.warn("terminal shutdown hung until its exit deadline:\n" + err[-4000:], stacklevel=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()


def test_unloadable_engine_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", DALLE_ENGINE_FACTORY="no_such_module:make",
               PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(ROOT)] if p))
    code = ("import sys; from bot.config import load_settings; from bot.terminal import main; "
            "sys.exit(main(load_settings()))")
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, input="", capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: engine factory") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


async def test_the_terminal_leaves_discord_users_jobs_alone(tmp_path):
    """The terminal and the Discord bot may share the default database: the terminal must not run or 'deliver'
    (print, mark delivered) a Discord user's queued job, which the bot could then never post."""
    settings = _settings(tmp_path)
    from bot.__main__ import main as _unused  # noqa: F401 - the schema comes from the migrations, as in real use
    from store.db import ensure_migrated

    ensure_migrated(settings.database_url, True)
    repo = Repository.from_url(settings.database_url)
    theirs = await repo.create_generation(user_id=4242, prompt="a green triangle", guild_id=777, channel_id=888,
                                          n_images=1, application_id=999, interaction_token="tok")
    await repo.close()
    out = io.StringIO()
    rc = await run(settings, stdin=io.StringIO("/dalle a red circle --n 1\n"), out=out, engine=FakeEngine())
    assert rc == 0 and "for 'a red circle'" in out.getvalue() and "green triangle" not in out.getvalue()
    rows = {g.id: g for g in await _rows(settings.database_url, Generation)}
    assert rows[theirs.id].status == "queued" and rows[theirs.id].delivered_at is None
    assert rows[theirs.id].interaction_token == "tok"
