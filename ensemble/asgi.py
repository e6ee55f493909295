"""``ensemble.asgi:app``: the server for any ASGI server on Trio.

    hypercorn --worker-class trio ensemble.asgi:app

The app is configured from the environment (``ENSEMBLE_*``, see
docs/configuration.md), over the TOML file named by ``ENSEMBLE_CONFIG`` if
set. Hypercorn's own options (bind, message size) come from its command
line; ``ensemble serve`` sets them from the config instead.
"""

from __future__ import annotations

import os

from .server._config import ServerConfig
from .transport._asgi import EnsembleApp, create_app


def _config() -> ServerConfig:
    path = os.environ.get("ENSEMBLE_CONFIG")
    base = ServerConfig.from_toml(path) if path else None
    return ServerConfig.from_env(base=base)


app: EnsembleApp = create_app(_config())
"""The ASGI application, built when this module is imported."""
