"""Who is on the other end of a connection: the result of authentication."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs


def _freeze(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class Identity:
    """An authenticated (or guest) user.

    Attributes:
        user_id: The user's id (rooms, notifications and presence use it).
        guest: A development-mode guest, not a verified user.
        expires_at: Unix time when the credential expires (a JWT's ``exp``);
            ``None`` when it does not. A connection must refresh before it,
            or it is closed with ``TOKEN_EXPIRED`` (4002).
        claims: The verified claims (a JWT's payload), read-only.
        source: Where the credential came from: ``"query"``, ``"cookie"``,
            ``"subprotocol"``, ``"message"`` or ``"guest"``.
    """

    user_id: str = attrs.field(validator=attrs.validators.min_len(1))
    guest: bool = False
    expires_at: float | None = None
    claims: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    source: str = "message"
