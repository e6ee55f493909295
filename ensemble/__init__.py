"""Ensemble: a realtime server for Python, built on Trio in the actor model.

The supervised actor runtime is :mod:`ensemble.actors`; fault injection for
tests is :mod:`ensemble.testing`.
"""

__version__ = "0.1.0"
