"""Pin the public surface of ``ensemble``, ``ensemble.actors``, ``ensemble.realtime`` and ``ensemble.testing``.

Adding, removing or renaming a public name must be a deliberate change here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import types
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "ensemble"

EXPECTED: dict[str, set[str]] = {
    "ensemble": {
        "ApprovalRequired",
        "Banned",
        "ConnectionInfo",
        "HistoryUnavailable",
        "Hub",
        "HubConfig",
        "InvalidMessage",
        "MemoryTransport",
        "ModelChange",
        "NotAMember",
        "NotAllowed",
        "NotFound",
        "Notification",
        "RateLimited",
        "RealtimeError",
        "Room",
        "RoomConfig",
        "RoomFull",
        "RoomMember",
        "RoomMessage",
        "TooManyConnections",
        "WSRateLimitConfig",
        "WebSocketRateLimiter",
        "open_hub",
    },
    "ensemble.realtime": {
        "ApprovalRequired",
        "Audience",
        "Banned",
        "CLOSE_GOING_AWAY",
        "CLOSE_INTERNAL_ERROR",
        "CLOSE_NORMAL",
        "Connected",
        "ConnectionInfo",
        "ConnectionManager",
        "ConnectionManagerStatistics",
        "Event",
        "HistoryUnavailable",
        "Hub",
        "HubConfig",
        "InMemoryNotificationStore",
        "InMemoryRoomStore",
        "InvalidMessage",
        "JoinRequest",
        "LiveConfig",
        "LiveQuery",
        "LiveStatistics",
        "LiveStore",
        "LiveWatch",
        "MemoryTransport",
        "ModelChange",
        "NotAMember",
        "NotAllowed",
        "NotFound",
        "Notification",
        "NotificationManager",
        "NotificationStore",
        "Outbox",
        "OutboxStatistics",
        "PERMISSIONS",
        "RateLimited",
        "RateLimiterStatistics",
        "RealtimeError",
        "Resumption",
        "Room",
        "RoomConfig",
        "RoomFull",
        "RoomJoin",
        "RoomMember",
        "RoomMessage",
        "RoomRecord",
        "RoomStatistics",
        "RoomStats",
        "RoomStore",
        "SLOW_CONSUMER",
        "SlidingWindowLimit",
        "Subscriber",
        "TooManyConnections",
        "Transport",
        "TransportClosed",
        "UserRecord",
        "WSRateLimitConfig",
        "WatchOverflowed",
        "WebSocketRateLimiter",
        "open_hub",
        "CLOSE_UNAUTHENTICATED",
        "authenticate_handshake",
        "origin_allows_cookies",
        "set_default_authenticator",
        "ws_auth_from_cookie",
        "ws_auth_from_query",
        "ws_authenticated",
        "RATE_LIMITED",
        "BatchTransport",
        "DirectTransport",
        "LIVE_RESET",
    },
    "ensemble.actors": {
        # _actor
        "DEFAULT_ASK_TIMEOUT",
        "Actor",
        "ActorRef",
        "ActorStatistics",
        # _errors
        "ActorCrashed",
        "ActorError",
        "ActorStartFailed",
        "ActorStopped",
        "AskTimeout",
        "MailboxFull",
        "MessageDropped",
        "SupervisorGaveUp",
        # _mailbox
        "DEFAULT_BLOCK_TIMEOUT",
        "DEFAULT_MAILBOX_SIZE",
        "MailboxConfig",
        "Overflow",
        # _supervisor
        "DEFAULT_SHUTDOWN",
        "Backoff",
        "ChildCounts",
        "ChildInfo",
        "ChildSpec",
        "Restart",
        "Strategy",
        "Supervisor",
        "SupervisorSpec",
        "SupervisorStatistics",
        "TreeNode",
        "open_actor",
        "open_supervisor",
    },
    "ensemble.testing": {
        "FaultInjector",
        "InjectedCrash",
        "InjectedFault",
        "Stall",
    },
    "ensemble.client": {
        "Backoff",
        "Client",
        "ClientError",
        "Closed",
        "Disconnected",
        "ServerError",
        "open_client",
    },
    "ensemble.protocol": {
        "Approve",
        "Auth",
        "Ban",
        "COMMAND_TYPES",
        "Clear",
        "CloseCode",
        "Command",
        "DECODE_ERRORS",
        "Delete",
        "Deny",
        "Edit",
        "History",
        "Join",
        "JoinRequests",
        "Kick",
        "Leave",
        "MarkAllRead",
        "MarkRead",
        "Members",
        "Notifications",
        "Options",
        "Ping",
        "Pong",
        "Position",
        "ProtocolError",
        "Ref",
        "RequestJoin",
        "Send",
        "SetRole",
        "Typing",
        "Unban",
        "Unread",
        "Unwatch",
        "Watch",
        "decode",
        "dumps",
        "encode_error",
        "encode_pong",
        "encode_reply",
        "encode_welcome",
    },
    "ensemble.server": {
        "AuthConfig",
        "Authenticator",
        "CallableAuthenticator",
        "GuestAuthenticator",
        "HandshakeResult",
        "HeartbeatConfig",
        "Identity",
        "JWTAuthenticator",
        "LimitsConfig",
        "ProtocolHandler",
        "RedactingFilter",
        "ServerConfig",
        "authenticate_handshake",
        "authenticate_token",
        "build_authenticator",
        "configure_logging",
        "redact",
        "serve",
    },
    "ensemble.transport": {
        "AsgiWebSocketTransport",
        "EnsembleApp",
        "create_app",
    },
}


def public_names(module: types.ModuleType) -> set[str]:
    """Names a module exports: not underscored, not a submodule."""
    return {name for name, value in vars(module).items() if not name.startswith("_") and not isinstance(value, types.ModuleType)}


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert public_names(module) == EXPECTED[module_name]


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_exports_are_defined_in_the_package(module_name: str) -> None:
    """Every public name comes from the package's own private modules."""
    module = importlib.import_module(module_name)
    for name in EXPECTED[module_name]:
        value = getattr(module, name)
        origin = getattr(value, "__module__", None)
        if origin is not None and not isinstance(
            value, (int, float, str, frozenset, types.UnionType)
        ):  # constants and type aliases have no home
            # Defined in a private module inside this package.
            private_inside = origin.startswith(module_name + ".") and "._" in origin
            assert private_inside, f"{module_name}.{name} comes from {origin}"


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_init_reexports_with_redundant_alias(module_name: str) -> None:
    """``__init__`` re-exports as ``X as X`` (the explicit re-export mypy strict wants)."""
    path = PACKAGE_ROOT.joinpath(*module_name.split(".")[1:], "__init__.py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1, f"{path}: import from outside the package: {ast.unparse(node)}"
            for alias in node.names:
                assert alias.asname == alias.name, f"{path}: {alias.name} is not re-exported as itself"
                imported.add(alias.name)
        elif isinstance(node, ast.Import):
            pytest.fail(f"{path}: plain import in a package __init__: {ast.unparse(node)}")
    assert imported == EXPECTED[module_name]


def test_public_names_helper() -> None:
    module = types.ModuleType("fake")
    module.Public = 1  # type: ignore[attr-defined]
    module._private = 2  # type: ignore[attr-defined]
    module.sub = types.ModuleType("fake.sub")  # type: ignore[attr-defined]
    assert public_names(module) == {"Public"}


def test_version_matches_the_distribution() -> None:
    import ensemble

    assert ensemble.__version__ == importlib.metadata.version("ensemble")
