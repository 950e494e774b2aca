"""Every runtime dependency's licence, and no strong copyleft among them (this project is MIT).

The runtime dependencies are ``[project] dependencies`` of pyproject.toml (no test extras), followed recursively
through the installed distributions' own requirements, with the extras each requirement asks for and the
environment markers of this interpreter. A dependency's licence is read from its metadata: ``License-Expression``
(SPDX) when present, otherwise the ``License`` field (when it is a short name, not a pasted licence text) and the
``License ::`` classifiers.

What fails the test: a *strong* copyleft licence (GPL, AGPL, and the like: SSPL, EUPL, OSL), whose terms would
reach this project's own code when it is distributed with or linked to it, unless the dependency offers a
non-copyleft alternative (``GPL-2.0 OR MIT``, or several ``License ::`` classifiers, which is how dual licences
are declared there).

What passes, and why: *weak* copyleft, LGPL (psycopg) and MPL-2.0 (part of tqdm). The LGPL's obligations cover
the library itself (its changes must be shared, and users must be able to replace it); importing an unmodified,
separately installed LGPL package from Python code does not make that code LGPL. MPL-2.0 is copyleft per file:
only changes to the MPL files themselves must be shared. This project modifies neither.

A dependency whose metadata names no licence at all fails too, unless it is in ``CHECKED_BY_HAND`` with the
licence someone read in its repository and why the metadata is not enough. Nothing is skipped.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# canonical name → (the licence, checked by hand in the project's repository, why the metadata does not say it).
# Empty today: every runtime dependency installed here names its licence in its metadata.
CHECKED_BY_HAND: dict[str, tuple[str, str]] = {}

_STRONG = re.compile(
    r"\bA?GPL|GNU (Affero )?General Public|\bSSPL|Server Side Public|\bEUPL|European Union Public|\bOSL-|Open Software"
    r" License",
    re.IGNORECASE,
)
_NOT_A_NAME = re.compile(r"^(copyright|permission is hereby|the .* license \(.*\)$)", re.IGNORECASE)


def is_strong_copyleft(licence: str) -> bool:
    """True when every alternative of an SPDX-like expression (``A OR B``) names a strong copyleft licence.

    ``LGPL-3.0`` and ``GNU Lesser General Public License`` are weak copyleft and do not count.
    """
    alternatives = re.split(r"\s+OR\s+|\s+or\s+", licence.replace("(", " ").replace(")", " "))
    return all(_STRONG.search(alt.replace("Lesser General Public", "Lesser")) for alt in alternatives if alt.strip())


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def runtime_distributions() -> dict[str, md.Distribution]:
    """Every installed distribution reachable from the project's runtime requirements."""
    found: dict[str, md.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    missing: list[str] = []
    todo: list[Requirement] = runtime_requirements()
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        wanted = set(req.extras) | {""}
        if key in extras_seen and wanted <= extras_seen[key]:
            continue
        try:
            dist = found.get(key) or md.distribution(req.name)
        except md.PackageNotFoundError:
            missing.append(str(req))
            continue
        found[key] = dist
        extras_seen.setdefault(key, set()).update(wanted)
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras_seen[key]):
                todo.append(sub)
    assert not missing, f"runtime requirements not installed, so their licences cannot be checked: {missing}"
    return found


def declared_licences(dist: md.Distribution) -> list[str]:
    """The licences a distribution's metadata names: its SPDX expression, or its License field and classifiers."""
    meta = dist.metadata
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return [expression]
    names = []
    field = (meta.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= 80 and not _NOT_A_NAME.match(field) and field != "UNKNOWN":
        names.append(field)
    names += [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return names


def licence_of(name: str, dist: md.Distribution) -> str:
    """One line for the table: the names joined with OR (several classifiers declare alternatives)."""
    if name in CHECKED_BY_HAND:
        return CHECKED_BY_HAND[name][0]
    names = declared_licences(dist)
    if not names:
        raise LookupError(f"{name} {dist.version}: no licence in its metadata; read it in its repository and add it to "
                          "CHECKED_BY_HAND with the reason")
    return " OR ".join(dict.fromkeys(names))


def test_every_runtime_dependency_has_a_licence_and_none_is_strong_copyleft():
    dists = runtime_distributions()
    table, unknown, copyleft = [], [], []
    for name in sorted(dists):
        try:
            licence = licence_of(name, dists[name])
        except LookupError as exc:
            unknown.append(str(exc))
            continue
        table.append(f"{name:24} {dists[name].version:14} {licence}")
        if is_strong_copyleft(licence):
            copyleft.append(f"{name}: {licence}")
    print("\n".join(table))  # the list, shown with -s
    assert not unknown, unknown
    assert not copyleft, f"strong copyleft runtime dependencies in an MIT project: {copyleft}"
    # the walk really reached the tree (direct and transitive) and the replacement of unidecode holds
    assert {"discord-py", "sqlalchemy", "greenlet", "jax", "anyascii"} <= set(dists)
    assert "unidecode" not in dists


def test_no_hand_checked_entry_hides_metadata():
    """An entry in CHECKED_BY_HAND is for a dependency whose metadata is silent, not for overruling what it says."""
    dists = runtime_distributions()
    for name in CHECKED_BY_HAND:
        if name in dists:
            assert not declared_licences(dists[name]), f"{name} names its licence; drop it from CHECKED_BY_HAND"


@pytest.mark.parametrize("licence,strong", [
    ("GPL-2.0-or-later", True),
    ("GNU General Public License v2 or later (GPLv2+)", True),
    ("AGPL-3.0-only", True),
    ("GNU Affero General Public License v3", True),
    ("MIT AND GPL-3.0-only", True),
    ("GPL OR GNU General Public License v2 or later (GPLv2+)", True),  # unidecode, as it declares itself
    ("GPL-2.0-only OR MIT", False),
    ("LGPL-3.0-only", False),
    ("GNU Lesser General Public License v3 (LGPLv3)", False),
    ("MPL-2.0 AND MIT", False),
    ("Apache-2.0 OR BSD-2-Clause", False),
    ("MIT-CMU", False),
])
def test_strong_copyleft_is_told_from_weak_and_permissive(licence, strong):
    assert is_strong_copyleft(licence) is strong


def test_the_licence_is_read_from_each_kind_of_metadata():
    class Fake:
        def __init__(self, **fields):
            self.metadata = _Meta(fields)
            self.version = "1"

    class _Meta:
        def __init__(self, fields):
            self.fields = fields

        def get(self, key, default=None):
            return self.fields.get(key, default)

        def get_all(self, key):
            return self.fields.get(key)

    assert licence_of("a", Fake(**{"License-Expression": "MIT", "License": "GPL"})) == "MIT"  # SPDX wins
    assert licence_of("b", Fake(License="Copyright (c) 2001 Someone\nAll rights", Classifier=[
        "License :: OSI Approved :: BSD License"])) == "BSD License"  # a pasted text is not a name
    assert licence_of("c", Fake(Classifier=["License :: OSI Approved :: Apache Software License",
                                            "License :: OSI Approved :: MIT License"])) == (
        "Apache Software License OR MIT License")
    with pytest.raises(LookupError, match="CHECKED_BY_HAND"):
        licence_of("d", Fake(License="UNKNOWN"))
