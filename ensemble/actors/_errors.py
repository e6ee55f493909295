"""Exception types raised by the actor runtime.

Every error names the actor (by its path) it is about, so a message such as
``MailboxFull: mailbox of /rooms/general is full (1000 messages)`` says what
happened and to whom.
"""

from __future__ import annotations


class ActorError(Exception):
    """Base class of every error raised by :mod:`ensemble.actors`.

    Attributes:
        path: The path of the actor or supervisor the error is about.
    """

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{detail}")
        self.path = path
        self.detail = detail


class MailboxFull(ActorError):
    """A message could not be queued because the actor's mailbox is full.

    Raised to the sender by the ``fail`` policy, by ``tell_nowait`` under the
    ``block`` policy, when a ``block`` sender's wait times out, and to the
    asker of an ``ask`` that the ``drop_newest`` policy refused.
    """


class MessageDropped(ActorError):
    """An ``ask`` was evicted from the mailbox before the actor handled it.

    Raised to the asker when ``drop_oldest`` evicted its message or when a
    newer message with the same key replaced it under ``keep_latest``.
    """


class ActorCrashed(ActorError):
    """The actor crashed while handling the message that was asked.

    The original exception is available as ``__cause__``. The message that
    caused the crash is dropped; the actor's supervisor decides what happens
    next.
    """


class ActorStopped(ActorError):
    """The actor (or supervisor) has stopped for good and takes no messages."""


class AskTimeout(ActorError, TimeoutError):
    """No reply arrived within the ``timeout`` given to ``ask``."""


class ActorStartFailed(ActorError):
    """``on_start`` raised when a child was first started.

    The original exception is available as ``__cause__``; the child is not
    registered with the supervisor.
    """


class SupervisorGaveUp(ActorError):
    """A supervisor exceeded its restart intensity and stopped its children.

    Raised out of :func:`open_supervisor` for a top-level supervisor, and
    reported to the parent supervisor (as a crash of that child) for a nested
    one. The last crash that was not survived is available as ``__cause__``.
    """
