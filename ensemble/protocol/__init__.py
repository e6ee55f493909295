"""The Ensemble wire protocol: sans-IO (bytes in, commands out; no trio).

See ``docs/protocol.md``.
"""

from ._close import CloseCode as CloseCode
