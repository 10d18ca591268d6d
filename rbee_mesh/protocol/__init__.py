"""The rbee-mesh wire protocol, sans I/O: bytes in, typed messages out.

Importing this package loads neither trio nor zmq; every actor and every transport shares it.
Its constants and errors are imported with it, its other modules when one of their names is
first read (`rbee_mesh/lazy.py`): the command line's tree needs the operation table, not msgpack.
"""

from typing import TYPE_CHECKING

from rbee_mesh.lazy import lazy_attributes
from rbee_mesh.protocol.constants import MAGIC, MAX_BODY_BYTES, PROTOCOL_VERSION
from rbee_mesh.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    MeshError,
    ProtocolError,
    RemoteProtocolError,
    TooLarge,
)

if TYPE_CHECKING:
    from rbee_mesh.protocol.codec import (
        HEADER,
        decode,
        decode_heartbeat,
        decode_state,
        encode,
        encode_batch,
        peek_route,
    )
    from rbee_mesh.protocol.jobs import STREAMED, JobLifecycle, JobState, outcome
    from rbee_mesh.protocol.liveness import Liveness, PeerClock, PeerLiveness
    from rbee_mesh.protocol.messages import (
        MESSAGE_TYPES,
        TERMINAL_KINDS,
        Accepted,
        Batch,
        Cancel,
        Cancelled,
        Data,
        Disconnect,
        Done,
        Error,
        Heartbeat,
        Kind,
        Level,
        Message,
        Narration,
        Ready,
        Submit,
        Token,
    )
    from rbee_mesh.protocol.operations import (
        OPERATIONS,
        Actor,
        HiveGet,
        HiveList,
        HiveRefresh,
        HiveStatus,
        Infer,
        JobCancel,
        JobList,
        JobWatch,
        ModelDelete,
        ModelDownload,
        ModelGet,
        ModelList,
        Operation,
        Ping,
        Status,
        WorkerDelete,
        WorkerGet,
        WorkerList,
        WorkerSpawn,
    )
else:  # each module imported when one of its names is first read
    __getattr__ = lazy_attributes(__name__)

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_BODY_BYTES",
    "MESSAGE_TYPES",
    "OPERATIONS",
    "PROTOCOL_VERSION",
    "STREAMED",
    "TERMINAL_KINDS",
    "Accepted",
    "Actor",
    "Batch",
    "Cancel",
    "Cancelled",
    "Data",
    "Disconnect",
    "Done",
    "Error",
    "ErrorCode",
    "Heartbeat",
    "HiveGet",
    "HiveList",
    "HiveRefresh",
    "HiveStatus",
    "Infer",
    "JobCancel",
    "JobLifecycle",
    "JobList",
    "JobState",
    "JobWatch",
    "Kind",
    "Level",
    "Liveness",
    "LocalProtocolError",
    "MeshError",
    "Message",
    "ModelDelete",
    "ModelDownload",
    "ModelGet",
    "ModelList",
    "Narration",
    "Operation",
    "PeerClock",
    "PeerLiveness",
    "Ping",
    "ProtocolError",
    "Ready",
    "RemoteProtocolError",
    "Status",
    "Submit",
    "Token",
    "TooLarge",
    "WorkerDelete",
    "WorkerGet",
    "WorkerList",
    "WorkerSpawn",
    "decode",
    "decode_heartbeat",
    "decode_state",
    "encode",
    "encode_batch",
    "outcome",
    "peek_route",
]
