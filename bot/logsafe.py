"""Logs that never show a secret: the settings' own (tokens, URL passwords) and Discord's interaction tokens.

Installed by ``python -m bot`` on the root logger's handlers, so it covers every library's records, at every
level, tracebacks included: the formatted line is redacted, whatever the logger. What it masks:

- every value in ``secrets`` (``Settings.secrets()``: DISCORD_TOKEN, ENGINE_TOKEN, passwords and secret query
  values of DATABASE_URL, REDIS_URL, ENGINE_URLS), also in its URL-quoted form;
- any URL's password (``scheme://user:***@``) and secret query values (``?password=***``, ``sslpassword``,
  ``token``);
- Discord interaction tokens, which discord.py logs at DEBUG: in request URLs (``/interactions/<id>/***/``,
  ``/webhooks/<application>/***``) and in gateway events (``'token': '***'``);
- ``Authorization: Bot …`` / ``Bearer …`` header values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote

MASK = "***"
_MIN_SECRET = 4  # shorter values would mask ordinary words; no real token or password is that short

_PATTERNS = [
    # scheme://user:password@host
    (re.compile(r"([a-zA-Z][\w+.-]*://[^\s/:@'\"]*:)[^\s@/'\"]+@"), rf"\g<1>{MASK}@"),
    # ?password=... &sslpassword=... &token=... &access_token=...
    (re.compile(r"([?&;](?:[\w.-]*(?:password|passwd|token|secret)[\w.-]*|pwd|api_?key)=)[^&\s'\"]+",
                re.IGNORECASE), rf"\g<1>{MASK}"),
    # interaction callbacks and follow-ups: /interactions/<id>/<token>/callback, /webhooks/<app id>/<token>
    (re.compile(r"(/(?:interactions|webhooks)/\d+/)[\w.-]+"), rf"\g<1>{MASK}"),
    # gateway payloads and dict reprs: 'token': '...'
    (re.compile(r"""(['"](?:token|access_token|password)['"]\s*:\s*['"])[^'"]+""", re.IGNORECASE), rf"\g<1>{MASK}"),
    # Authorization: Bot <token> / Bearer <token>
    (re.compile(r"""(Authorization['"]?\s*[:=]\s*['"]?(?:Bot|Bearer)\s+)[^\s'"]+""", re.IGNORECASE),
     rf"\g<1>{MASK}"),
]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret value and every secret-shaped part (see the module doc) masked."""
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SECRET}, key=len, reverse=True):
        text = text.replace(secret, MASK)
        quoted = quote(secret, safe="")
        if quoted != secret:
            text = text.replace(quoted, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter and redacts the whole formatted record (message, traceback, stack)."""

    def __init__(self, inner: logging.Formatter | None, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets)


def install(secrets: Iterable[str] = (), logger: logging.Logger | None = None) -> None:
    """Redact every handler of ``logger`` (the root logger by default); safe to call again."""
    secrets = tuple(secrets)
    for handler in (logger or logging.getLogger()).handlers:
        inner = handler.formatter
        if isinstance(inner, RedactingFormatter):
            inner = inner.inner
        handler.setFormatter(RedactingFormatter(inner, secrets))
