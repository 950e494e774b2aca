"""The rule of the house, checked on every import statement of the source tree (function-local imports too).

Front ends (cogs, app, terminal, web, views) are thin and reach data only through services; the bot reaches the
engine only through ``engine.client`` / ``engine.api``; ``store/`` is the only package that talks to the
database; ``engine/`` imports neither the bot, the store nor training; ``training/`` never imports the bot and
the bot never imports training; ``bench/`` never imports ``tests/``; no private name crosses a module boundary;
and no module under ``bot/`` or ``store/`` is past 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "engine", "store", "training", "bench", "migrations")
PROJECT = (*PACKAGES, "tests")
MAX_LINES = 500

# (importing package or module prefix, imported prefixes it may not use)
FORBIDDEN = [
    ("engine", ("bot", "store", "training", "bench", "tests")),
    ("store", ("bot", "engine", "training", "bench", "tests")),
    ("training", ("bot", "bench", "tests")),
    ("bot", ("training", "bench", "tests")),
    ("bench", ("tests",)),
]
ENGINE_DOORS = ("engine.api", "engine.client")
FRONT_ENDS = ("bot.cogs", "bot.app", "bot.terminal", "bot.web", "bot.views")
DATABASE_LIBRARIES = ("sqlalchemy", "alembic", "asyncpg", "psycopg", "aiosqlite")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(root: Path) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py"))


def _imports(path: Path, root: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import in the file, relative ones resolved."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(root: Path) -> dict[str, list[str]]:
    rules: dict[str, list[str]] = {"layers": [], "engine door": [], "front ends": [], "database": [],
                                   "private names": []}
    for path in _sources(root):
        module = _module_name(path, root)
        where = f"{path.relative_to(root)}"
        for line, imported, names in _imports(path, root):
            for importer, banned in FORBIDDEN:
                if _within(module, (importer,)) and _within(imported, banned):
                    rules["layers"].append(f"{where}:{line} imports {imported}")
            if _within(module, ("bot",)) and _within(imported, ("engine",)):
                targets = [imported] if names == [] else [imported, *(f"{imported}.{n}" for n in names)]
                if not any(_within(t, ENGINE_DOORS) for t in targets):
                    rules["engine door"].append(f"{where}:{line} imports {imported}")
            if _within(module, FRONT_ENDS) and _within(imported, ("store",)):
                rules["front ends"].append(f"{where}:{line} imports {imported}")
            if not _within(module, ("store", "migrations")) and _within(imported, DATABASE_LIBRARIES):
                rules["database"].append(f"{where}:{line} imports {imported}")
            if _within(imported, PROJECT) and imported != module:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    rules["private names"].append(f"{where}:{line} takes {', '.join(private)} from {imported}")
    return rules


VIOLATIONS = _violations(ROOT)


@pytest.mark.parametrize("rule", sorted(VIOLATIONS))
def test_layer_rule_holds(rule: str) -> None:
    assert VIOLATIONS[rule] == [], f"{rule}: " + "; ".join(VIOLATIONS[rule])


def test_no_bot_or_store_module_past_the_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for package in ("bot", "store") for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    """A tree that breaks every rule once: each rule reports exactly its own break."""
    files = {
        "bot/cogs/probe.py": "from store.repository import Repository\n",
        "bot/runner.py": "def f():\n    from engine.pipeline import load_pipeline\n    from engine.api import Engine\n",
        "bot/wiring.py": "from .runner import _private\nfrom bot.runner import public\n",
        "engine/model.py": "import training.fixtures\n",
        "training/loop.py": "from sqlalchemy import select\n",
        "store/ok.py": "from sqlalchemy import select\nfrom store.repo import _shared\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = _violations(tmp_path)
    assert found["front ends"] == ["bot/cogs/probe.py:1 imports store.repository"]
    assert found["engine door"] == ["bot/runner.py:2 imports engine.pipeline"]
    assert found["private names"] == ["bot/wiring.py:1 takes _private from bot.runner",
                                      "store/ok.py:2 takes _shared from store.repo"]
    assert found["layers"] == ["engine/model.py:1 imports training.fixtures"]
    assert found["database"] == ["training/loop.py:1 imports sqlalchemy"]
