"""The command line: help, ``serve`` options into a ServerConfig, and starting the server.

``python -m ensemble`` with no command still runs the demo: tests/test_demo.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ensemble.__main__ as cli
from ensemble.server._config import ServerConfig

SECRET = "a-test-secret-of-at-least-32-bytes!"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ENSEMBLE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ensemble" in out
    assert "serve" in out
    assert "demo" in out
    assert "realtime server" in out


def test_serve_help_lists_the_options_and_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--transport", "--config FILE", "--allowed-origin", "--log-format", "--dev", "--check"):
        assert option in out, option
    assert "ENSEMBLE_CONFIG" in out
    assert "ENSEMBLE_AUTH_JWT_SECRET" in out
    assert "docs/configuration.md" in out
    assert "development mode" in out


def test_serve_defaults() -> None:
    config = cli.parse_serve_config([], environ={})
    assert config == ServerConfig()
    assert config.auth.dev_mode_active


def test_serve_options() -> None:
    config = cli.parse_serve_config(
        [
            "--host",
            "localhost",
            "--port",
            "9100",
            "--transport",
            "native",
            "--allowed-origin",
            "https://a.example.com",
            "--allowed-origin",
            "https://b.example.com",
            "--log-level",
            "debug",
            "--log-format",
            "json",
        ],
        environ={},
    )
    assert (config.host, config.port, config.transport) == ("localhost", 9100, "native")
    assert config.allowed_origins == ("https://a.example.com", "https://b.example.com")
    assert (config.log_level, config.log_format) == ("DEBUG", "json")


def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--port", "eighty"], ["--transport", "tornado"], ["--log-format", "xml"], ["--bogus"]):
        with pytest.raises(SystemExit) as info:
            cli.parse_serve_config(argv, environ={})
        assert info.value.code == 2
    assert "invalid choice: 'tornado'" in capsys.readouterr().err


def test_precedence_defaults_toml_environment_options(tmp_path: Path) -> None:
    path = tmp_path / "ensemble.toml"
    path.write_text('[server]\nport = 9001\nhost = "localhost"\nlog_format = "json"\n\n[limits]\nmax_message_size = 1000\n')
    environ = {"ENSEMBLE_PORT": "9002", "ENSEMBLE_LIMITS_MAX_MESSAGE_SIZE": "2000"}
    config = cli.parse_serve_config(["--config", str(path), "--port", "9003"], environ=environ)
    assert config.port == 9003  # option > environment > file
    assert config.limits.max_message_size == 2000  # environment > file
    assert config.host == "localhost"  # file > default
    assert config.log_format == "json"
    # ENSEMBLE_CONFIG names the file when --config is not given.
    from_env = cli.parse_serve_config([], environ={"ENSEMBLE_CONFIG": str(path)})
    assert from_env.port == 9001


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--config", "/nonexistent/ensemble.toml"], {}, "cannot read the config file"),
        ([], {"ENSEMBLE_PROT": "1"}, "unknown environment variable ENSEMBLE_PROT"),
        (["--allowed-origin", "https://*.example.com"], {}, "wildcard"),
        (["--dev"], {"ENSEMBLE_AUTH_JWT_SECRET": SECRET}, "dev_mode cannot be on"),
        (["--port", "70000"], {}, "port must be between"),
    ],
)
def test_invalid_configuration(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(cli.ConfigError, match=message):
        cli.parse_serve_config(argv, environ=environ)


def test_an_invalid_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\n")
    with pytest.raises(cli.ConfigError):
        cli.parse_serve_config(["--config", str(path)], environ={})


def test_dev_mode_is_refused_on_a_public_address_unless_asked_for() -> None:
    with pytest.raises(cli.ConfigError, match="not a loopback address"):
        cli.parse_serve_config(["--host", "0.0.0.0"], environ={})
    forced = cli.parse_serve_config(["--host", "0.0.0.0", "--dev"], environ={})
    assert forced.auth.dev_mode is True
    secured = cli.parse_serve_config(["--host", "0.0.0.0"], environ={"ENSEMBLE_AUTH_JWT_SECRET": SECRET})
    assert not secured.auth.dev_mode_active
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert cli.parse_serve_config(["--host", host], environ={}).auth.dev_mode_active


def test_check_prints_a_summary_without_secrets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ENSEMBLE_AUTH_JWT_SECRET", SECRET)
    monkeypatch.setenv("ENSEMBLE_API_KEYS", "key-one,key-two")
    monkeypatch.setattr(cli, "_load_serve", lambda: pytest.fail("--check must not start a server"))
    assert cli.main(["serve", "--check"]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out
    assert "JWT (HS256, shared secret)" in out
    assert "HTTP API keys: 2" in out
    assert SECRET not in out
    assert "key-one" not in out


def test_check_in_dev_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--check"]) == 0
    assert "DEVELOPMENT MODE" in capsys.readouterr().out


def test_serve_without_a_server_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_load_serve", lambda: None)
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    assert info.value.code == 2
    assert "ensemble.server.serve is missing" in capsys.readouterr().err


def test_a_configuration_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--host", "0.0.0.0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble serve: error: ")
    assert "Traceback" not in err


@pytest.fixture(autouse=True)
def restore_gc() -> Any:
    """``ensemble serve`` tunes the process's garbage collector: undone after each test."""
    import gc

    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.parametrize(("argv", "expected"), [([], 50_000), (["--config", "GC"], 0)])
def test_serve_tunes_the_garbage_collector(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None, tmp_path: Any, argv: list[str], expected: int
) -> None:
    import gc

    gc.set_threshold(700, 10, 10)
    seen: list[tuple[int, int, int]] = []
    frozen: list[int] = []
    monkeypatch.setattr(cli, "_load_serve", lambda: lambda config: (seen.append(gc.get_threshold()), frozen.append(gc.get_freeze_count())))
    if argv:
        path = tmp_path / "ensemble.toml"
        path.write_text("[server]\ngc_threshold = 0\n")
        argv = ["--config", str(path)]
    assert cli.main(["serve", *argv]) == 0
    if expected:
        assert seen == [(expected, 20, 100)]
        assert frozen[0] > 0  # the start-up objects are never scanned again
    else:
        assert seen == [(700, 10, 10)]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_serve_calls_the_server_with_the_config(monkeypatch: pytest.MonkeyPatch, restore_logging: None, asynchronous: bool) -> None:
    received: list[Any] = []

    def sync_serve(config: ServerConfig) -> None:
        received.append(config)

    async def async_serve(config: ServerConfig) -> None:
        import trio

        await trio.lowlevel.checkpoint()
        received.append(config)

    monkeypatch.setattr(cli, "_load_serve", lambda: async_serve if asynchronous else sync_serve)
    assert cli.main(["serve", "--port", "9200", "--log-format", "json"]) == 0
    (config,) = received
    assert isinstance(config, ServerConfig)
    assert config.port == 9200
    from ensemble.server._logging import JSONFormatter, RedactingFilter

    (handler,) = [handler for handler in logging.getLogger().handlers if isinstance(handler.formatter, JSONFormatter)]
    assert any(isinstance(f, RedactingFilter) for f in handler.filters)


def test_load_serve_finds_the_server_when_it_exists() -> None:
    serve = cli._load_serve()
    try:
        import ensemble.server._serve  # noqa: F401
    except ModuleNotFoundError:
        assert serve is None or callable(serve)
    else:
        assert callable(serve)


def test_python_dash_m_ensemble_help() -> None:
    result = subprocess.run([sys.executable, "-m", "ensemble", "serve", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--transport {hypercorn,native}" in result.stdout
