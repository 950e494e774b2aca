"""``python -m bench <name> [args]``: run one benchmark (``bench/<name>.py``'s ``main(argv)``).

Benchmarks print their figures and a ratio against a baseline measured in the same run; results worth
keeping go to ``bench/RESULTS.md`` with the machine they ran on.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    """The benchmark modules; packages (fakes, reference implementations) are their helpers, not benchmarks."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.ispkg and not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench <name> [args]\nbenchmarks: {', '.join(names) or '(none)'}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
