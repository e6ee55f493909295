"""Structured logging: one line per event, JSON or text, with secrets redacted.

:func:`configure_logging` installs one handler on the root logger (so the
server's, hypercorn's and your own records look alike). Every record goes
through a :class:`RedactingFilter` first, which replaces anything that looks
like a credential (a JWT, ``token=...``/``api_key=...`` parameters,
``Bearer ...`` values, and the exact secrets it is given) with
``[REDACTED]``, in the message, its arguments and any traceback.

A text line: ``2024-05-01T12:00:00.123Z INFO ensemble.server.auth: message``;
a JSON line: ``{"ts": ..., "level": ..., "logger": ..., "message": ...}``
plus the record's extra fields (``logger.info("...", extra={"user": u})``)
and ``exc`` with the traceback. Newlines inside a message are escaped, so an
event is always one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import IO, Any, Final

REDACTED: Final = "[REDACTED]"

_PATTERNS: Final = (
    # A JWT (or any JWS): three base64url parts, the first an encoded JSON object.
    re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    # Credentials in query strings, cookies, headers and key=value text.
    re.compile(
        r"(?i)(?P<key>\b(?:access_token|refresh_token|id_token|token|api[_-]?key|apikey|secret|password|passwd|sessionid)"
        r"[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s&;,\"']+)"
    ),
    re.compile(r"(?i)(?P<key>\b(?:bearer|basic)\s+)(?P<value>[A-Za-z0-9._~+/=-]+)"),
    # A token subprotocol (ensemble.token.<token>).
    re.compile(r"(?P<key>\.token\.)(?P<value>[A-Za-z0-9._~+/=-]+)"),
)

_STANDARD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"})


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with credentials replaced by ``[REDACTED]``.

    Args:
        text: Any text.
        secrets: Exact strings to redact as well (API keys, the JWT secret).
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        if "value" in pattern.groupindex:
            text = pattern.sub(lambda match: match.group("key") + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Redacts credentials from a record's message and traceback.

    The message is formatted (``msg % args``) and redacted, and the record's
    ``args`` cleared; a traceback is formatted into ``exc_text`` and
    redacted. It never drops a record.

    Args:
        secrets: Exact strings to redact (API keys, the JWT secret), besides
            anything that looks like a credential.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(sorted({secret for secret in secrets if secret}, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always keep it."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we can
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message, self.secrets)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and isinstance(value, str):
                setattr(record, key, redact(value, self.secrets))
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")}


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> key=value ...``, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """One line for ``record``."""
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts.extend(f"{key}={value!r}" for key, value in _extras(record).items())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += " | " + record.exc_text
        if record.stack_info:
            line += " | " + record.stack_info
        return _one_line(line)


class JSONFormatter(logging.Formatter):
    """One JSON object per record (``ts``, ``level``, ``logger``, ``message``,
    extra fields, and ``exc`` with a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line for ``record``."""
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            data.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return json.dumps(data, default=repr, ensure_ascii=False, separators=(",", ":"))


class _EnsembleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (and replaces)."""


def configure_logging(
    level: str | int = "INFO",
    fmt: str = "text",
    *,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send log records to ``stream``, one line per event, redacted.

    Calling it again replaces the handler it installed before (other
    handlers of the root logger are left alone).

    Args:
        level: The root logger's level (``"INFO"``, ``logging.DEBUG``, ...).
        fmt: ``"text"`` or ``"json"``.
        secrets: Exact strings to redact (API keys, the JWT secret).
        stream: Where lines go (default: ``sys.stderr``).

    Returns:
        The installed handler.

    Raises:
        ValueError: An unknown format or level.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}")
        level = resolved
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _EnsembleHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _EnsembleHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
