"""The wire protocol: message records, the CBOR codec and its one error type."""

from ._codec import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._codec import VersionError as VersionError
from ._codec import decode as decode
from ._codec import encode as encode
from ._codec import error_reply as error_reply
from ._errors import WIRE_ERROR_REASONS as WIRE_ERROR_REASONS
from ._errors import WireError as WireError
from ._messages import *  # noqa: F403  (the message classes; listed in _messages.__all__)
from ._messages import __all__ as _message_names
from ._records import EXPIRED_PREFIX as EXPIRED_PREFIX
from ._records import TASK_OPTIONS as TASK_OPTIONS
from ._records import UNDECODABLE_PREFIX as UNDECODABLE_PREFIX
from ._records import ResultRecord as ResultRecord
from ._records import TaskEnvelope as TaskEnvelope
from ._records import epoch as epoch
from ._records import from_epoch as from_epoch
from ._records import results_to_wire as results_to_wire
from ._split import MESSAGE_OVERHEAD as MESSAGE_OVERHEAD
from ._split import message_budget as message_budget
from ._split import result_chunks as result_chunks
from ._split import result_weight as result_weight
from ._split import split_by_bytes as split_by_bytes
from ._split import task_weight as task_weight
from ._split import text_bytes as text_bytes

__all__ = [
    "EXPIRED_PREFIX",
    "MESSAGE_OVERHEAD",
    "PROTOCOL_VERSION",
    "TASK_OPTIONS",
    "UNDECODABLE_PREFIX",
    "WIRE_ERROR_REASONS",
    "ResultRecord",
    "TaskEnvelope",
    "VersionError",
    "WireError",
    "decode",
    "encode",
    "epoch",
    "error_reply",
    "from_epoch",
    "message_budget",
    "result_chunks",
    "result_weight",
    "results_to_wire",
    "split_by_bytes",
    "task_weight",
    "text_bytes",
    *_message_names,
]
