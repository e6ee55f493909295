"""Supervised actors on Trio.

An *actor* handles one message at a time from a bounded *mailbox*; users hold
its :class:`ActorRef`. A *supervisor* starts actors (and nested supervisors),
restarts them when they crash by an Erlang/OTP strategy, and gives up when
they crash too often. Timers are deadlines inside each actor's own loop.

See ``docs/actors.md`` for the model and examples.
"""

from ._actor import (
    DEFAULT_ASK_TIMEOUT as DEFAULT_ASK_TIMEOUT,
    Actor as Actor,
    ActorRef as ActorRef,
    ActorStatistics as ActorStatistics,
)
from ._errors import (
    ActorCrashed as ActorCrashed,
    ActorError as ActorError,
    ActorStartFailed as ActorStartFailed,
    ActorStopped as ActorStopped,
    AskTimeout as AskTimeout,
    MailboxFull as MailboxFull,
    MessageDropped as MessageDropped,
    SupervisorGaveUp as SupervisorGaveUp,
)
from ._mailbox import (
    DEFAULT_BLOCK_TIMEOUT as DEFAULT_BLOCK_TIMEOUT,
    DEFAULT_MAILBOX_SIZE as DEFAULT_MAILBOX_SIZE,
    MailboxConfig as MailboxConfig,
    Overflow as Overflow,
)
from ._supervisor import (
    DEFAULT_SHUTDOWN as DEFAULT_SHUTDOWN,
    Backoff as Backoff,
    ChildCounts as ChildCounts,
    ChildInfo as ChildInfo,
    ChildSpec as ChildSpec,
    Restart as Restart,
    Strategy as Strategy,
    Supervisor as Supervisor,
    SupervisorSpec as SupervisorSpec,
    SupervisorStatistics as SupervisorStatistics,
    TreeNode as TreeNode,
    open_actor as open_actor,
    open_supervisor as open_supervisor,
)
