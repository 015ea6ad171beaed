"""The wire protocol: message records, the CBOR codec and its one error type."""

from ._codec import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._codec import decode as decode
from ._codec import encode as encode
from ._errors import WIRE_ERROR_REASONS as WIRE_ERROR_REASONS
from ._errors import WireError as WireError
from ._messages import *  # noqa: F403  (the message classes; listed in _messages.__all__)
from ._messages import __all__ as _message_names
from ._records import TASK_OPTIONS as TASK_OPTIONS
from ._records import ResultRecord as ResultRecord
from ._records import TaskEnvelope as TaskEnvelope
from ._records import epoch as epoch
from ._records import from_epoch as from_epoch

__all__ = [
    "PROTOCOL_VERSION",
    "TASK_OPTIONS",
    "WIRE_ERROR_REASONS",
    "ResultRecord",
    "TaskEnvelope",
    "WireError",
    "decode",
    "encode",
    "epoch",
    "from_epoch",
    *_message_names,
]
