"""The terminal front end: in-process over StringIO, and as a real subprocess driven through stdin."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import select

from bot.local import _parse_dalle, run
from store.models import Feedback, Generation, Refusal
from store.repository import Repository
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[1]


def _settings(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(database_url=f"sqlite:///{tmp_path / 'local.db'}", output_dir=str(tmp_path / "outputs"),
                           rate_limit_user="100 per minute", daily_quota=None, default_images=4)


async def _rows(url: str, model):
    repo = Repository.from_url(url)
    async with repo.sessions() as s:
        rows = list((await s.execute(select(model))).scalars())
    await repo.close()
    return rows


def test_parse_options():
    assert _parse_dalle("a red circle --n 4 --seed 7") == ("a red circle", {"n": 4, "seed": 7})
    assert _parse_dalle("--images 2 a cat's hat") == ("a cat's hat", {"n": 2})
    for bad in ("a --n", "a --seed x"):
        try:
            _parse_dalle(bad)
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
    script2 = f"/feedback {image_id} up\n/feedback {image_id} report bias too samey\n/feedback 9999 up\n/queue\n"
    await run(settings, stdin=io.StringIO(script2), out=out2, engine=FakeEngine())
    text2 = out2.getvalue()
    assert "Thanks for the feedback!" in text2 and "a moderator will review" in text2
    assert "error: Image 9999 does not exist." in text2 and "Your queue is empty." in text2
    fb = await _rows(settings.database_url, Feedback)
    assert sorted((f.kind, f.reason, f.note) for f in fb) == [("report", "bias", "too samey"), ("up", None, None)]


def test_python_m_bot_subprocess_over_stdin(tmp_path):
    """``python -m bot`` (or bot.local.main where the entry module is not merged yet) driven through stdin."""
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'sub.db'}", OUTPUT_DIR=str(tmp_path / "outputs"),
        DALLE_ENGINE_FACTORY="tests.fake_engine:inprocess_fake_engine", PYTHONPATH=os.pathsep.join(
            p for p in [os.environ.get("PYTHONPATH", ""), str(ROOT)] if p),
    )
    if (ROOT / "bot" / "__main__.py").exists():
        cmd = [sys.executable, "-m", "bot"]
    else:
        cmd = [sys.executable, "-c", (
            "import os, sys, types; from bot.local import main; "
            "s = types.SimpleNamespace(database_url=os.environ['DATABASE_URL'], output_dir=os.environ['OUTPUT_DIR']);"
            "sys.exit(main(s))")]
    proc = subprocess.run(cmd, input="/dalle a red circle --n 2 --seed 5\n/queue\n", capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "queued at position 1 (seed 5)" in proc.stdout
    files = re.findall(r"(\S+\.png)", proc.stdout)
    assert len(files) == 2 and all(Path(f).is_file() for f in files)
    assert "Traceback" not in proc.stderr


def test_unloadable_engine_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", DALLE_ENGINE_FACTORY="no_such_module:make",
               PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(ROOT)] if p))
    code = "import sys, types; from bot.local import main; sys.exit(main(types.SimpleNamespace()))"
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, input="", capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: engine factory") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
