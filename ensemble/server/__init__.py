"""The server: protocol handling, authentication, configuration, HTTP API.

Transport-independent: ``ensemble.transport`` adapters (hypercorn's ASGI,
and later a native one) call into it; it never imports them.
"""

from ._handler import Authenticator as Authenticator, ProtocolHandler as ProtocolHandler
from ._identity import Identity as Identity
