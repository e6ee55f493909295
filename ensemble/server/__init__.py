"""The server: protocol handling, authentication, configuration, HTTP API.

Transport-independent: ``ensemble.transport`` adapters (hypercorn's ASGI,
and later a native one) call into it; it never imports them, except
``serve()`` (``_serve.py``), the composition root, which imports the
transport it starts lazily.
"""

from ._auth import (
    Authenticator as Authenticator,
    CallableAuthenticator as CallableAuthenticator,
    GuestAuthenticator as GuestAuthenticator,
    HandshakeResult as HandshakeResult,
    JWTAuthenticator as JWTAuthenticator,
    authenticate_handshake as authenticate_handshake,
    authenticate_token as authenticate_token,
    build_authenticator as build_authenticator,
)
from ._config import (
    AuthConfig as AuthConfig,
    HeartbeatConfig as HeartbeatConfig,
    LimitsConfig as LimitsConfig,
    ServerConfig as ServerConfig,
)
from ._handler import ProtocolHandler as ProtocolHandler
from ._identity import Identity as Identity
from ._logging import RedactingFilter as RedactingFilter, configure_logging as configure_logging, redact as redact
from ._serve import serve as serve
