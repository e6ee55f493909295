"""The JSON codec of the wire: orjson, chosen by measurement, with a fallback.

``benchmarks/bench_json.py`` (figures in docs/benchmarks.md) measured orjson
about 15x faster than the standard library at encoding events and 2-5x at
decoding client frames, with byte-identical output for the events Ensemble
sends (compact separators, UTF-8, non-ASCII kept). Values orjson refuses
(integers beyond 64 bits, say) are encoded by the standard library instead,
so the choice changes speed, never what can be sent. Not-a-number and
infinite floats (not JSON) are encoded as ``null``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["JSONDecodeError", "dumps", "loads"]

JSONDecodeError = orjson.JSONDecodeError
"""Raised by :func:`loads` (a subclass of :class:`json.JSONDecodeError` and ``ValueError``)."""

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any, *, default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON.

    Args:
        value: A JSON-ready value (dicts, lists, tuples, str, int, float,
            bool, None; anything else goes through ``default``).
        default: Converts a value the codec does not know to one it does, or
            raises ``TypeError``.

    Returns:
        The encoded bytes.

    Raises:
        TypeError: ``value`` holds something that cannot be encoded.
    """
    try:
        return orjson.dumps(value, default=default, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        cause = exc.__cause__
        if isinstance(cause, TypeError) and default is not None and not str(exc).startswith("Integer"):
            raise cause from None  # ``default``'s own refusal
        # orjson refuses some valid values (integers beyond 64 bits, deep
        # nesting): the standard library decides.
        return json.dumps(value, default=default, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def loads(data: str | bytes) -> Any:
    """Decode one JSON document (``JSONDecodeError`` if it is not valid JSON)."""
    return orjson.loads(data)
