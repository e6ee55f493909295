"""Transports: thin adapters from sockets to actor messages.

Nothing in :mod:`ensemble.actors` imports from here; the wire codec is
sans-IO. The hypercorn and native transports arrive with the server.
"""
