"""A Python client for Ensemble servers (trio-websocket): reconnects with
backoff and jitter and resumes every joined room from its last position."""

from ._client import (
    Backoff as Backoff,
    Client as Client,
    ClientError as ClientError,
    Closed as Closed,
    Disconnected as Disconnected,
    ServerError as ServerError,
    open_client as open_client,
)
