"""The actor runtime: actors with mailboxes, and one-for-one supervisors, on trio."""

from ._actor import Actor as Actor
from ._actor import ActorError as ActorError
from ._actor import ActorRef as ActorRef
from ._actor import ActorStatistics as ActorStatistics
from ._actor import ActorStopped as ActorStopped
from ._actor import AskTimeout as AskTimeout
from ._actor import Feed as Feed
from ._actor import GetStatistics as GetStatistics
from ._actor import MailboxFull as MailboxFull
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorStatistics as SupervisorStatistics

__all__ = [
    "Actor",
    "ActorError",
    "ActorRef",
    "ActorStatistics",
    "ActorStopped",
    "AskTimeout",
    "Feed",
    "GetStatistics",
    "MailboxFull",
    "Supervisor",
    "SupervisorStatistics",
]
