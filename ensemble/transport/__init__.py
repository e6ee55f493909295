"""Transports: thin adapters from sockets to actor messages.

Nothing in :mod:`ensemble.actors` imports from here; the wire codec
(:mod:`ensemble.protocol`) is sans-IO. ``_asgi`` is the ASGI transport
(``create_app``; hypercorn's trio worker serves it, see ``ensemble.asgi``):
it authenticates the handshake, hands client frames to the protocol handler
and writes what the connection actors give it. A native transport comes
with the next issue.
"""

from ._asgi import AsgiWebSocketTransport as AsgiWebSocketTransport, EnsembleApp as EnsembleApp, create_app as create_app
