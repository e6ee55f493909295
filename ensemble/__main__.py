"""``python -m ensemble`` (and the ``ensemble`` command).

``ensemble`` with no command runs the embedded actor demo (as it always
has); ``ensemble serve`` starts the realtime server. The server's options
come from, in increasing priority: defaults, a TOML file (``--config`` or
``ENSEMBLE_CONFIG``), ``ENSEMBLE_*`` environment variables, and the
command-line options. :func:`parse_serve_config` does all of that without
starting anything.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._demo import main as run_demo

DESCRIPTION = "Ensemble: a realtime server for Python, on Trio in the actor model."

SERVE_EPILOG = """\
configuration, in increasing priority:
  defaults < TOML file (--config, or ENSEMBLE_CONFIG) < ENSEMBLE_* environment
  variables < these options. Every option, its default, TOML key and environment
  variable are listed in docs/configuration.md. Examples:
    ENSEMBLE_AUTH_JWT_SECRET_FILE=/run/secrets/jwt   HMAC secret of HS256 tokens
    ENSEMBLE_API_KEYS_FILE=/run/secrets/api-keys     keys of the HTTP API
    ENSEMBLE_ALLOWED_ORIGINS=https://chat.example.com

development mode:
  with no authentication configured (no JWT secret or public key, no
  authenticator) the server gives every connection a guest identity, and says
  so loudly in the log. It is refused on a non-loopback --host unless --dev is
  given explicitly.

examples:
  ensemble serve                                  development server on 127.0.0.1:8000
  ensemble serve --config ensemble.toml --port 9000
  ENSEMBLE_AUTH_JWT_SECRET=... ensemble serve --host 0.0.0.0
"""


class ConfigError(Exception):
    """The command line, a config file or the environment is invalid."""


def build_parser() -> argparse.ArgumentParser:
    """The ``ensemble`` argument parser (``demo`` and ``serve``)."""
    parser = argparse.ArgumentParser(
        prog="ensemble",
        description=DESCRIPTION,
        epilog="Run 'ensemble serve --help' for the server's options. With no command, the embedded actor demo runs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{serve,demo}")
    sub.add_parser("demo", help="run the embedded actor demo (the default with no command)", description="Run the embedded actor demo.")
    serve = sub.add_parser(
        "serve",
        help="run the realtime server (WebSocket endpoint /ws, HTTP API, metrics, demo page)",
        description="Run the Ensemble realtime server: the WebSocket endpoint at /ws, the HTTP API, /healthz, /readyz, /metrics and the demo chat page at /.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", metavar="FILE", help="a TOML config file (default: $ENSEMBLE_CONFIG, if set)")
    serve.add_argument("--host", help="the address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="the TCP port, 0 for any free port (default: 8000)")
    serve.add_argument("--transport", choices=("hypercorn", "native"), help="the server implementation (default: hypercorn)")
    serve.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        metavar="ORIGIN",
        help="an exact origin (https://chat.example.com) whose pages may connect; repeat for more; replaces the configured list",
    )
    serve.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), type=str.upper, help="(default: INFO)")
    serve.add_argument("--log-format", choices=("text", "json"), help="one line per event either way (default: text)")
    serve.add_argument(
        "--dev", action="store_true", help="force development mode (guest identities); an error if authentication is configured"
    )
    serve.add_argument("--check", action="store_true", help="validate the configuration, print a summary (no secrets) and exit")
    return parser


def build_serve_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """The :class:`~ensemble.server.ServerConfig` of parsed ``serve`` arguments.

    Args:
        args: From :func:`build_parser`.
        environ: The environment (default: ``os.environ``).

    Returns:
        The config (defaults < TOML file < environment < options).

    Raises:
        ConfigError: Any invalid value, file or combination.
    """
    from .server._config import ServerConfig

    environ = os.environ if environ is None else environ
    path = args.config or environ.get("ENSEMBLE_CONFIG") or None
    try:
        config = ServerConfig.from_toml(path) if path else ServerConfig()
        config = ServerConfig.from_env(environ, base=config)
        config = config.evolve(
            host=args.host,
            port=args.port,
            transport=args.transport,
            allowed_origins=tuple(args.allowed_origins) if args.allowed_origins else None,
            log_level=args.log_level,
            log_format=args.log_format,
            auth__dev_mode=True if args.dev else None,
        )
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path!r}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(str(exc)) from None
    if config.auth.dev_mode_active and config.auth.dev_mode is not True and not config.is_loopback:
        raise ConfigError(
            f"no authentication is configured and --host {config.host} is not a loopback address: "
            "configure auth (ENSEMBLE_AUTH_JWT_SECRET, ...) or pass --dev to serve guests on purpose"
        )
    return config


def parse_serve_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Any:
    """Parse ``serve`` options (``argv`` without ``serve``) into a ServerConfig.

    Raises:
        ConfigError: See :func:`build_serve_config`.
        SystemExit: The arguments do not parse (argparse's usage error).
    """
    args = build_parser().parse_args(["serve", *argv])
    return build_serve_config(args, environ)


def describe(config: Any) -> list[str]:
    """A summary of a config, without secrets (``serve --check``)."""
    auth = config.auth
    if auth.authenticator is not None:
        mode = f"authenticator {auth.authenticator}"
    elif auth.jwt_enabled:
        key = "shared secret" if auth.jwt_secret is not None else "public key"
        mode = f"JWT ({', '.join(auth.jwt_algorithms)}, {key})"
    elif auth.dev_mode_active:
        mode = "DEVELOPMENT MODE (guest identities, no authentication)"
    else:
        mode = "none configured (every connection refused)"
    origins = ", ".join(config.allowed_origins) or "the server's own origin only"
    return [
        f"listen: {config.host}:{config.port} ({config.transport})",
        f"auth: {mode}",
        f"allowed origins: {origins}",
        f"HTTP API keys: {len(config.api_keys)}",
        f"limits: max message {config.limits.max_message_size} bytes, "
        f"{config.limits.max_connections} connections ({config.limits.max_connections_per_user} per user), "
        f"{config.limits.max_rooms_per_connection} rooms per connection",
        f"heartbeat: every {config.heartbeat.interval:g} s, timeout {config.heartbeat.timeout:g} s",
        f"logging: {config.log_level} {config.log_format}",
    ]


def _load_serve() -> Callable[..., Any] | None:
    """``ensemble.server.serve``, or ``None`` when this build has none."""
    server = importlib.import_module("ensemble.server")
    serve = getattr(server, "serve", None)
    if serve is not None:
        return serve  # type: ignore[no-any-return]
    try:
        module = importlib.import_module("ensemble.server._serve")
    except ModuleNotFoundError as exc:
        if exc.name == "ensemble.server._serve":
            return None
        raise
    return getattr(module, "serve", None)


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = build_serve_config(args)
    except ConfigError as exc:
        parser.exit(2, f"ensemble serve: error: {exc}\n")
    if args.check:
        print("configuration OK")
        for line in describe(config):
            print(f"  {line}")
        return 0
    serve = _load_serve()
    if serve is None:
        parser.exit(2, "ensemble serve: error: the server is not available in this build (ensemble.server.serve is missing)\n")
    from .server._logging import configure_logging

    secrets = [*config.api_keys, config.auth.jwt_secret or ""]
    configure_logging(config.log_level, config.log_format, secrets=secrets)
    if config.gc_threshold:
        # The server owns this process: start-up objects are never garbage, and
        # thousands of long-lived connections make the default thresholds
        # collect (and scan them) far too often (a third of the CPU of a
        # connection storm).
        gc.freeze()
        _, second, third = gc.get_threshold()
        gc.set_threshold(config.gc_threshold, max(second, 20), max(third, 100))
    try:
        if inspect.iscoroutinefunction(serve):
            import trio

            trio.run(serve, config)
        else:
            serve(config)
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command in (None, "demo"):
        logging.basicConfig(level=logging.CRITICAL)
        run_demo()
        return 0
    return _serve(parser, args)


if __name__ == "__main__":
    sys.exit(main())
