"""Who calls the engine service: named client tokens, and which client made which job.

The service takes ``ENGINE_TOKEN`` (the operator's token, client name ``default``) and/or ``ENGINE_TOKENS``
(``name:token,name:token``: one token per client, e.g. one per bot deployment). A request is authenticated by the
bearer token it sends, which names its client; a job can then be read, followed or cancelled only by the client
that submitted it (another client gets the same 404 as for an id that does not exist, so ids do not leak
between clients). Admin routes (``/admin/reload``) need the operator's ``ENGINE_TOKEN``.

Without any token the service has no clients (loopback only, as before) and every caller is the same one.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping

DEFAULT_CLIENT = "default"  # the name of ENGINE_TOKEN's client
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_client_tokens(text: str | None) -> dict[str, str]:
    """``name:token,name:token`` → ``{name: token}``. Raises ValueError naming the problem, never a token."""
    out: dict[str, str] = {}
    for i, item in enumerate((text or "").split(","), 1):
        item = item.strip()
        if not item:
            continue
        name, sep, token = item.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise ValueError(f"entry {i} must be name:token (the value is not shown)")
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"entry {i}: a client name is 1-64 letters, digits, '_', '.' or '-'")
        if name in out:
            raise ValueError(f"client {name!r} is given twice")
        out[name] = token
    return out


class Clients:
    """The service's clients: which name a bearer token belongs to."""

    def __init__(self, token: str | None = None, tokens: Mapping[str, str] | None = None) -> None:
        named = dict(tokens or {})
        for name, value in named.items():
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"engine client name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
            if not value or not value.strip():
                raise ValueError(f"the token of engine client {name!r} must not be empty")
        if token is not None:
            if not token.strip():
                raise ValueError("the engine token must not be empty")
            if DEFAULT_CLIENT in named:
                raise ValueError(f"client name {DEFAULT_CLIENT!r} is ENGINE_TOKEN's; name the others differently")
            named[DEFAULT_CLIENT] = token
        if len(set(named.values())) != len(named):
            raise ValueError("two engine clients have the same token: each client needs its own")
        self._tokens = {name: value.encode() for name, value in named.items()}

    @property
    def required(self) -> bool:
        """Whether requests must authenticate (any token configured)."""
        return bool(self._tokens)

    @property
    def names(self) -> list[str]:
        return sorted(self._tokens)

    def identify(self, given: bytes) -> str | None:
        """The client whose token ``given`` is, else None. Every token is compared (in constant time each), so
        the time taken does not tell which client nearly matched."""
        found = None
        for name, token in self._tokens.items():
            if hmac.compare_digest(given, token):
                found = name
        return found


class JobOwners:
    """Which client made each job. Entries of jobs the batcher has forgotten (``alive(id)`` false: their result
    outlived its TTL) are dropped in a sweep when the map doubles, so it stays as big as the jobs the service
    holds, at an amortised O(1) per job."""

    def __init__(self, alive: Callable[[str], bool], floor: int = 1024) -> None:
        self._alive = alive
        self._owners: dict[str, str | None] = {}
        self._floor = floor
        self._sweep_at = floor

    def __len__(self) -> int:
        return len(self._owners)

    def record(self, job_id: str, client: str | None) -> None:
        self._owners[job_id] = client
        if len(self._owners) > self._sweep_at:
            for gone in [j for j in self._owners if not self._alive(j)]:
                del self._owners[gone]
            self._sweep_at = max(self._floor, 2 * len(self._owners))

    def allows(self, job_id: str, client: str | None) -> bool:
        """Whether ``client`` may see or cancel the job. An id with no owner recorded is nobody's: a job the
        batcher holds but whose submit has not returned yet is not shown to anyone (ids are the clients' choice,
        so another client could guess one)."""
        return job_id in self._owners and self._owners[job_id] == client
