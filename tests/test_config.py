"""ServerConfig: defaults, validation, TOML, environment, secrets, and the docs."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ensemble.realtime import HubConfig
from ensemble.server._config import AuthConfig, HeartbeatConfig, LimitsConfig, ServerConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SECRET = "s" * 32


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return _pem(ec.generate_private_key(ec.SECP256R1()))


# -- defaults ---------------------------------------------------------------------------


def test_defaults() -> None:
    config = ServerConfig()
    assert (config.host, config.port, config.transport) == ("127.0.0.1", 8000, "hypercorn")
    assert config.allowed_origins == ()
    assert config.api_keys == ()
    assert config.shutdown_timeout == 10.0
    assert (config.log_level, config.log_format) == ("INFO", "text")
    auth = config.auth
    assert auth.jwt_algorithms == ("HS256",)
    assert auth.require_exp is True
    assert (auth.cookie_name, auth.query_param, auth.subprotocol) == ("sessionid", "token", "ensemble")
    assert auth.auth_timeout == 10.0
    assert auth.dev_mode is None
    limits = config.limits
    assert limits.max_message_size == 65536
    assert limits.max_rooms_per_connection == 100
    assert (config.heartbeat.interval, config.heartbeat.timeout) == (20.0, 20.0)
    assert config.hub == HubConfig()
    assert config.is_loopback


def test_dev_mode_is_automatic_only_without_any_authentication(rsa_pem: str) -> None:
    assert AuthConfig().dev_mode_active
    assert not AuthConfig(jwt_secret=SECRET).dev_mode_active
    assert not AuthConfig(jwt_public_key=rsa_pem, jwt_algorithms=["RS256"]).dev_mode_active
    assert not AuthConfig(authenticator="myapp.auth:verify").dev_mode_active
    assert not AuthConfig(dev_mode=False).dev_mode_active
    assert AuthConfig(dev_mode=True).dev_mode_active
    with pytest.raises(ValueError, match="dev_mode cannot be on"):
        AuthConfig(dev_mode=True, jwt_secret=SECRET)
    with pytest.raises(ValueError, match="dev_mode cannot be on"):
        AuthConfig(dev_mode=True, authenticator="myapp.auth:verify")


def test_the_hub_takes_the_servers_connection_limits() -> None:
    config = ServerConfig(limits=LimitsConfig(max_connections=5, max_connections_per_user=None), hub=HubConfig(name="edge"))
    hub = config.hub_config()
    assert (hub.name, hub.max_connections, hub.max_connections_per_user) == ("edge", 5, None)


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": 70000}, "port must be between"),
        ({"port": -1}, "port must be between"),
        ({"host": ""}, "host must be"),
        ({"transport": "tornado"}, "transport must be one of hypercorn, native"),
        ({"log_format": "xml"}, "log_format must be one of"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"shutdown_timeout": 0}, "shutdown_timeout must be a finite number"),
        ({"shutdown_timeout": float("nan")}, "shutdown_timeout must be a finite number"),
        ({"allowed_origins": ["*"]}, "exact origin"),
        ({"allowed_origins": ["https://*.example.com"]}, "no path, trailing slash, wildcard"),
        ({"allowed_origins": ["https://chat.example.com/"]}, "no path, trailing slash"),
        ({"allowed_origins": ["chat.example.com"]}, "exact origin"),
        ({"allowed_origins": ["null"]}, "exact origin"),
        ({"allowed_origins": ["https://Chat.Example.com"]}, "lowercase"),
        ({"api_keys": ["has space"]}, "api_keys must be non-empty strings"),
    ],
)
def test_invalid_server_options(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig(**changes)  # type: ignore[arg-type]


def test_wrong_types_are_refused() -> None:
    with pytest.raises(TypeError, match="port must be an int"):
        ServerConfig(port="80")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="port must be an int"):
        ServerConfig(port=True)
    with pytest.raises(TypeError, match="max_message_size must be an int"):
        LimitsConfig(max_message_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ServerConfig(auth={"jwt_secret": SECRET})  # type: ignore[arg-type]


def test_log_level_is_case_insensitive() -> None:
    assert ServerConfig(log_level="debug").log_level == "DEBUG"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"jwt_algorithms": ["none"]}, "must not include 'none'"),
        ({"jwt_algorithms": ["NONE"]}, "must not include 'none'"),
        ({"jwt_algorithms": ["HS256", "none"]}, "must not include 'none'"),
        ({"jwt_algorithms": []}, "at least one algorithm"),
        ({"jwt_algorithms": ["HS257"]}, "unsupported JWT algorithm"),
        ({"jwt_algorithms": ["HS256", "RS256"]}, "must not mix HMAC"),
        ({"jwt_secret": "short"}, "at least 32 bytes"),
        ({"jwt_secret": "x" * 40, "jwt_algorithms": ["HS512"]}, "at least 64 bytes"),
        ({"jwt_secret": SECRET, "jwt_algorithms": ["RS256"]}, "jwt_secret needs HMAC"),
        ({"jwt_secret": "-----BEGIN PUBLIC KEY-----" + "x" * 40}, "looks like a PEM key"),
        ({"jwt_public_key": "not a key", "jwt_algorithms": ["RS256"]}, "not a PEM public key"),
        ({"jwt_secret": SECRET, "authenticator": "a.b:c"}, "either an authenticator or JWT"),
        ({"leeway": -1}, "leeway must be"),
        ({"auth_timeout": 0}, "auth_timeout must be"),
        ({"cookie_name": "bad name"}, "cookie_name must be"),
        ({"subprotocol": ""}, "subprotocol must be"),
        ({"user_claim": ""}, "user_claim must be"),
    ],
)
def test_invalid_auth_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AuthConfig(**options)  # type: ignore[arg-type]


def test_a_public_key_must_suit_every_algorithm(rsa_pem: str, ec_pem: str) -> None:
    with pytest.raises(ValueError, match="needs public-key jwt_algorithms"):
        AuthConfig(jwt_public_key=rsa_pem)  # the default HS256 with a public key: algorithm confusion
    with pytest.raises(ValueError, match="cannot verify ES256"):
        AuthConfig(jwt_public_key=rsa_pem, jwt_algorithms=["ES256"])
    with pytest.raises(ValueError, match="cannot verify RS256"):
        AuthConfig(jwt_public_key=ec_pem, jwt_algorithms=["RS256"])
    with pytest.raises(ValueError, match="not both"):
        AuthConfig(jwt_public_key=rsa_pem, jwt_secret=SECRET, jwt_algorithms=["RS256"])
    assert AuthConfig(jwt_public_key=rsa_pem, jwt_algorithms=["RS256", "PS256"]).jwt_enabled
    assert AuthConfig(jwt_public_key=ec_pem, jwt_algorithms="ES256").jwt_algorithms == ("ES256",)


@pytest.mark.parametrize(
    ("section", "options", "message"),
    [
        (LimitsConfig, {"max_message_size": 0}, "max_message_size must be at least 1"),
        (LimitsConfig, {"max_rooms_per_connection": 0}, "at least 1"),
        (LimitsConfig, {"max_connections_per_user": 0}, "at least 1"),
        (LimitsConfig, {"max_handshake_bytes": 10}, "at least 256"),
        (LimitsConfig, {"handshake_timeout": float("inf")}, "finite"),
        (HeartbeatConfig, {"interval": 0}, "interval must be"),
        (HeartbeatConfig, {"timeout": -1}, "timeout must be"),
    ],
)
def test_invalid_limits_and_heartbeat(section: type, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        section(**options)


# -- secrets ----------------------------------------------------------------------------


def test_secrets_are_not_in_the_repr(rsa_pem: str) -> None:
    config = ServerConfig(api_keys=["api-key-1234567890"], auth=AuthConfig(jwt_secret=SECRET))
    text = repr(config)
    assert "api-key-1234567890" not in text
    assert SECRET not in text
    assert "jwt_algorithms=('HS256',)" in text  # the rest is shown
    keyed = repr(AuthConfig(jwt_public_key=rsa_pem, jwt_algorithms=["RS256"]))
    assert "BEGIN PUBLIC KEY" not in keyed


def test_a_bad_api_key_is_not_quoted_in_the_error() -> None:
    with pytest.raises(ValueError, match="api_keys") as info:
        ServerConfig(api_keys=["sekrit value"])
    assert "sekrit" not in str(info.value)


# -- from_mapping and from_toml -----------------------------------------------------


def test_from_mapping() -> None:
    config = ServerConfig.from_mapping(
        {
            "port": 9000,
            "allowed_origins": ["https://chat.example.com"],
            "auth": {"jwt_secret": SECRET, "jwt_audience": "chat"},
            "limits": {"max_message_size": 1024},
            "heartbeat": {"interval": 5},
            "hub": {"name": "edge", "room": {"history_size": 7}},
        }
    )
    assert config.port == 9000
    assert config.allowed_origins == ("https://chat.example.com",)
    assert config.auth.jwt_audience == "chat"
    assert config.limits.max_message_size == 1024
    assert config.heartbeat.interval == 5
    assert config.hub.name == "edge"
    assert config.hub.room.history_size == 7


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prot": 1}, r"unknown server config keys: prot \(known: .*port"),
        ({"auth": {"jwt_secrt": "x"}}, r"unknown keys in \[auth\]: jwt_secrt \(known: .*jwt_secret"),
        ({"limits": {"max_msg": 1}}, r"unknown keys in \[limits\]: max_msg"),
        ({"heartbeat": {"every": 1}}, r"unknown keys in \[heartbeat\]: every"),
        ({"hub": {"nmae": "x"}}, r"unknown hub config keys: nmae"),
        ({"hub": {"room": {"size": 1}}}, r"unknown keys in \[room\]: size"),
        ({"hub": {"max_connections": 5}}, r"set max_connections in \[limits\], not \[hub\]"),
        ({"auth": "x"}, r"\[auth\] must be a table"),
    ],
)
def test_from_mapping_refuses_unknown_keys(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_mapping(data)


def test_from_toml(tmp_path: Path) -> None:
    (tmp_path / "jwt").write_text(SECRET + "\n")
    (tmp_path / "keys").write_text("key-one\nkey-two\n")
    path = tmp_path / "ensemble.toml"
    path.write_text(
        """
[server]
port = 9001
api_keys_file = "keys"

[auth]
jwt_secret_file = "jwt"

[limits]
max_connections_per_user = 3

[hub.rate_limit]
burst_size = 5
"""
    )
    config = ServerConfig.from_toml(path)
    assert config.port == 9001
    assert config.api_keys == ("key-one", "key-two")
    assert config.auth.jwt_secret == SECRET  # relative to the TOML file, stripped
    assert config.limits.max_connections_per_user == 3
    assert config.hub.rate_limit.burst_size == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sever]\nport = 1\n", r"unknown tables or keys: sever \(known tables: server, auth, limits, heartbeat, hub\)"),
        ("port = 1\n", r"unknown tables or keys: port"),
        ("[server]\nprot = 1\n", r"unknown server config keys: prot"),
        ("[auth]\nalgorithms = ['HS256']\n", r"unknown keys in \[auth\]: algorithms"),
        ("[auth]\njwt_algorithms = ['none']\n", r"must not include 'none'"),
        ("[auth]\njwt_secret_file = 'missing'\n", r"auth.jwt_secret_file: cannot read"),
        ("[server]\nport = 'x'\n", r"port must be an int"),
        ("[server.auth]\nleeway = 1\n[auth]\nleeway = 2\n", r"\[auth\] is given twice"),
    ],
)
def test_from_toml_errors_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises((ValueError, TypeError), match=message) as info:
        ServerConfig.from_toml(path)
    assert str(path) in str(info.value)


def test_from_toml_of_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert ServerConfig.from_toml(path) == ServerConfig()


# -- from_env and evolve ------------------------------------------------------------


def test_from_env_overlays_a_config(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("k1\nk2\n")
    base = ServerConfig(port=9000, log_format="json", limits=LimitsConfig(max_message_size=512))
    config = ServerConfig.from_env(
        {
            "ENSEMBLE_HOST": "0.0.0.0",
            "ENSEMBLE_ALLOWED_ORIGINS": "https://a.example.com, http://localhost:8000",
            "ENSEMBLE_API_KEYS_FILE": str(tmp_path / "keys"),
            "ENSEMBLE_AUTH_JWT_SECRET": SECRET * 2,  # 64 bytes: enough for HS384
            "ENSEMBLE_AUTH_JWT_ALGORITHMS": "HS256,HS384",
            "ENSEMBLE_AUTH_REQUIRE_EXP": "false",
            "ENSEMBLE_AUTH_LEEWAY": "2.5",
            "ENSEMBLE_LIMITS_MAX_CONNECTIONS_PER_USER": "none",
            "ENSEMBLE_HEARTBEAT_TIMEOUT": "7",
            "ENSEMBLE_HUB_NAME": "edge",
            "ENSEMBLE_CONFIG": "ignored.toml",
            "PATH": "/usr/bin",  # not ours
        },
        base=base,
    )
    assert config.host == "0.0.0.0"
    assert config.port == 9000  # kept from the base
    assert config.log_format == "json"
    assert config.allowed_origins == ("https://a.example.com", "http://localhost:8000")
    assert config.api_keys == ("k1", "k2")
    assert config.auth.jwt_secret == SECRET * 2
    assert config.auth.jwt_algorithms == ("HS256", "HS384")
    assert config.auth.require_exp is False
    assert config.auth.leeway == 2.5
    assert config.limits.max_message_size == 512  # kept
    assert config.limits.max_connections_per_user is None
    assert config.heartbeat.timeout == 7.0
    assert config.hub.name == "edge"


def test_from_env_with_a_secret_file(tmp_path: Path) -> None:
    (tmp_path / "jwt").write_text(SECRET + "\n")
    config = ServerConfig.from_env({"ENSEMBLE_AUTH_JWT_SECRET_FILE": str(tmp_path / "jwt")})
    assert config.auth.jwt_secret == SECRET
    assert not config.auth.dev_mode_active


def test_from_env_with_a_custom_prefix() -> None:
    config = ServerConfig.from_env({"CHAT_PORT": "1234", "ENSEMBLE_PORT": "1"}, prefix="CHAT_")
    assert config.port == 1234


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ENSEMBLE_AUTH_JWT_SECRT": "x"}, r"unknown environment variable ENSEMBLE_AUTH_JWT_SECRT \(did you mean ENSEMBLE_AUTH_JWT_SECRET"),
        ({"ENSEMBLE_PORT": "eighty"}, r"ENSEMBLE_PORT: expected an integer"),
        ({"ENSEMBLE_AUTH_REQUIRE_EXP": "maybe"}, r"ENSEMBLE_AUTH_REQUIRE_EXP: expected true or false"),
        ({"ENSEMBLE_HEARTBEAT_INTERVAL": "soon"}, r"expected a number"),
        ({"ENSEMBLE_AUTH_JWT_ALGORITHMS": "none"}, r"must not include 'none'"),
        ({"ENSEMBLE_HUB_MAX_CONNECTIONS": "5"}, r"unknown environment variable ENSEMBLE_HUB_MAX_CONNECTIONS"),
        ({"ENSEMBLE_API_KEYS": "a", "ENSEMBLE_API_KEYS_FILE": "f"}, r"not both"),
        ({"ENSEMBLE_AUTH_JWT_SECRET_FILE": "/nonexistent/jwt"}, r"ENSEMBLE_AUTH_JWT_SECRET_FILE: cannot read"),
    ],
)
def test_from_env_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_env(environ)


def test_a_secret_in_the_environment_is_not_quoted_in_errors() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes") as info:
        ServerConfig.from_env({"ENSEMBLE_AUTH_JWT_SECRET": "tooshort-secret-value"})
    assert "tooshort-secret-value" not in str(info.value)


def test_evolve_applies_overrides_and_ignores_none() -> None:
    config = ServerConfig().evolve(host="0.0.0.0", port=None, auth__dev_mode=True, limits__max_message_size=100)
    assert config.host == "0.0.0.0"
    assert config.port == 8000
    assert config.auth.dev_mode is True
    assert config.limits.max_message_size == 100
    with pytest.raises(ValueError, match="unknown server config option 'prot'"):
        ServerConfig().evolve(prot=1)
    with pytest.raises(ValueError, match=r"unknown key in \[limits\]: size"):
        ServerConfig().evolve(limits__size=1)
    with pytest.raises(ValueError, match="unknown config section"):
        ServerConfig().evolve(nope__x=1)
    with pytest.raises(ValueError, match="port must be between"):
        ServerConfig().evolve(port=-5)


# -- the documentation ----------------------------------------------------------------


def _toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    blocks = _toml_blocks()
    assert len(blocks) == 1
    text = blocks[0].replace("/run/secrets/", f"{tmp_path.as_posix()}/")
    (tmp_path / "ensemble-api-keys").write_text("documented-key\n")
    (tmp_path / "ensemble-jwt").write_text(SECRET)
    path = tmp_path / "ensemble.toml"
    path.write_text(text)
    config = ServerConfig.from_toml(path)
    assert config.host == "0.0.0.0"
    assert config.allowed_origins == ("https://chat.example.com", "http://localhost:8000")
    assert config.api_keys == ("documented-key",)
    assert config.log_format == "json"
    assert config.auth.jwt_secret == SECRET
    assert (config.auth.jwt_audience, config.auth.jwt_issuer) == ("chat", "https://auth.example.com")
    assert config.limits.max_connections_per_user == 20
    assert config.hub.room.history_size == 200
    assert not config.auth.dev_mode_active


def test_the_documentation_lists_every_option_and_variable() -> None:
    text = DOCS.read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \|\s*(?:`([A-Z_]+)`)?\s*\| (.*?) \|", text, flags=re.M)
    assert len(rows) > 40
    documented = {key for key, _, _ in rows}
    variables = {var for _, var, _ in rows if var}
    sections: list[type] = [ServerConfig, AuthConfig, LimitsConfig, HeartbeatConfig, HubConfig]
    for cls in sections:
        for field in attrs.fields(cls):
            if cls is ServerConfig and field.name in ("auth", "limits", "heartbeat", "hub"):
                continue
            if cls is HubConfig and field.name in ("max_connections", "max_connections_per_user"):
                continue  # set in [limits]
            assert field.name in documented, f"{cls.__name__}.{field.name} is not documented"
    from ensemble.server._config import _env_table

    assert set(_env_table("ENSEMBLE_")) == variables
    # The defaults in the tables are the real ones (for the scalar options).
    defaults = {
        **{f.name: f.default for f in attrs.fields(ServerConfig)},
        **{f.name: f.default for f in attrs.fields(AuthConfig)},
        **{f.name: f.default for f in attrs.fields(LimitsConfig)},
    }
    for key, _, default in rows:
        value = defaults.get(key)
        if isinstance(value, (bool, int, float, str)) and default:
            shown = default.strip("`")
            expected = {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else value
            if isinstance(value, str):
                assert shown == f'"{value}"', key
            else:
                assert shown == str(expected), key
