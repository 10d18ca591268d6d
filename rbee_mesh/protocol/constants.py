"""Every number the protocol fixes, stated once: the version, ports, limits and timings.

Each limit here has one meaning, and code that enforces it names it. docs/protocol.md explains
them; where the two disagree, that is a bug in one of them.
"""

from __future__ import annotations

#: The first frame of every message: this magic, then one byte, PROTOCOL_VERSION.
MAGIC = b"RBEE"
#: 2: SUBMIT carries `accept_by`, ERROR carries `started`, READY carries a client's session.
#: 3: every socket beyond a process is CURVE; the FORBIDDEN error code; trust operations.
#: 4: SUBMIT carries `keep`; the job_watch operation.
#: 5: BATCH: a job's narration and data records, coalesced.
#: 6: CHUNK: bytes of a model, from the hive that holds it to one that fetches it (model_read).
PROTOCOL_VERSION = 6

# ---- well-known ports ---------------------------------------------------------------------------

#: Where keepers reach a queen (its ROUTER).
QUEEN_PORT = 7833
#: Where the queen serves its OpenAI-compatible HTTP API.
API_PORT = 7834
#: Where a queen reaches a hive (its ROUTER), and where the hive publishes its heartbeats (PUB).
HIVE_PORT = 7835
HEARTBEAT_PORT = 7836
#: Where a queen serves keepers unless told otherwise: the LAN (CURVE admits only the keys it
#: trusts), and with `--local-only` this machine alone.
DEFAULT_QUEEN_BIND = f"tcp://0.0.0.0:{QUEEN_PORT}"
LOCAL_QUEEN_BIND = f"tcp://127.0.0.1:{QUEEN_PORT}"
#: Where a queen serves its OpenAI-compatible HTTP API unless told otherwise: this machine
#: only, where it needs no API key.
DEFAULT_API_BIND = f"127.0.0.1:{API_PORT}"
#: HTTP requests the queen's API serves at once: each holds a job on the API's one connection to
#: the queen (where a keeper runs at most MAX_JOBS_PER_KEEPER), and a body of up to
#: MAX_BODY_BYTES while it is read. Past this a request is answered 429 at once; /health never is.
MAX_API_REQUESTS = 1_000

# ---- frames -------------------------------------------------------------------------------------

#: A message is exactly this many frames: header, kind, job id, body.
FRAME_COUNT = 4
#: The job id frame, in bytes.
MAX_JOB_ID = 64
#: The body of one message, in bytes. A result that does not fit fails its job RESULT_TOO_LARGE.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Values (containers and the items in them) in one body. Decoding builds a Python object per
#: value and checks it; this bounds what the worst frame a peer can send costs (a few ms), where
#: MAX_BODY_BYTES alone would admit four million one-byte values.
MAX_BODY_VALUES = 32_768
#: The longest sentence for a person a frame carries (a narration, an error message).
MAX_SENTENCE = 8_192
#: How deep free-form values (results, records, heartbeat state) may nest.
MAX_VALUE_DEPTH = 16
#: A job's NARRATION and DATA frames that come within this long of its last streamed frame are
#: held, and go together as one BATCH frame when it has passed (or before any other frame of the
#: job): per-frame costs are paid once per burst, and a lone frame is never held.
COALESCE_S = 0.001
#: The frames one BATCH holds, and the bytes of their bodies. A body of n bytes holds at most n
#: values, so a BATCH is always far within MAX_BODY_VALUES; a frame bigger than this goes alone.
MAX_BATCH = 256
BATCH_BYTES = 16 * 1024

#: The bytes of a file one CHUNK frame carries (a model, hive to hive): big enough that a
#: frame's own costs vanish beside its bytes, small enough to be read, sent and written while
#: others are in flight.
MAX_CHUNK_BYTES = 1 << 20
#: The bytes one `model_read` job may ask for (it streams them as CHUNK frames).
MAX_READ_BYTES = 16 * MAX_CHUNK_BYTES
#: The hives a queen names to one that fetches a model from the mesh (in the order to try).
MAX_MESH_SOURCES = 8

# ---- liveness -----------------------------------------------------------------------------------

#: Default heartbeat interval, in seconds, of every link. A peer that falls silent (frozen, its
#: link cut, killed) is found lost 3.5 intervals after its last frame, so within 1.75-2.25 s of
#: the fault: under the 3 s that `rbee-mesh bench --detection` holds the mesh to (at 1 s it was
#: 3.5-4 s). A queen of 1,000 hives takes two frames per hive per interval for it (its cost:
#: docs/benchmarks.md, "Scale"); such a mesh can run its hives at `--heartbeat 1`.
HEARTBEAT_S = 0.5
#: The shortest interval a peer may keep: a server's heartbeat schedule wakes twice per the
#: shortest interval among its peers, and no peer may make it spin.
MIN_HEARTBEAT_S = 0.05
#: The longest interval a peer may keep (and so the longest it may stay silent, a few times over,
#: before its server forgets it).
MAX_HEARTBEAT_S = 60.0
#: Missed intervals after which a peer is suspect.
SUSPECT_AFTER = 1
#: Missed intervals after which a client gives up on its server: its jobs there end (HIVE_LOST,
#: WORKER_LOST, UNAVAILABLE) and the connection is fenced.
CLIENT_LOST_AFTER = 3
#: Missed intervals after which a server gives up on a client and cancels its jobs: one fewer
#: than the client's, so that by the time a client reports a job lost, its server has stopped it.
SERVER_LOST_AFTER = CLIENT_LOST_AFTER - 1
#: How long a worker waits for a silent hive (or one that never came) before it exits. A hive
#: that dies takes its workers at once (PR_SET_PDEATHSIG); one that only stalls (a long pause,
#: a stopped process, a starved machine) finds them there when it comes back, models loaded,
#: and meanwhile cancels their jobs itself. The hive kills a worker silent for
#: CLIENT_LOST_AFTER of its intervals, so a job it reports lost has stopped there.
WORKER_PATIENCE_S = 30.0
#: How long an actor that forwards a job one hop down (queen to hive, hive to worker) waits for
#: it to be accepted. Past that the job counts as not started, and it is not: the SUBMIT's
#: `accept_by` fell before, and the next hop refuses it if it arrives later (a cut link, a frozen
#: process). A job not started may be placed elsewhere.
FORWARD_ACCEPT_S = 2.0
#: The longest deadline a job may have, in seconds (a week): what a SUBMIT may ask for, and what
#: an operation's own default is cut to (a ping of 100,000 pongs 10 s apart would ask for 11 days).
MAX_DEADLINE_S = 7 * 86_400.0

# ---- hives --------------------------------------------------------------------------------------

#: Workers one hive runs at once (its heartbeat lists each of them).
MAX_WORKERS_PER_HIVE = 64
#: Hives a queen keeps announcements of: those found on the LAN (by mDNS, which anyone there may
#: send), and of them those it lists without linking (pending: a key it does not trust; or
#: another protocol). Past this the oldest is forgotten.
MAX_ANNOUNCED_HIVES = 1_024
#: Jobs one keeper's connection may run at once at a queen; past this its SUBMITs are BUSY.
MAX_JOBS_PER_KEEPER = 1_000
#: Connections one key may hold open to one server at once (a node's keepers share its key);
#: past this a new one is told DISCONNECT.
MAX_CONNECTIONS_PER_KEY = 256
#: A queen keeps each job's frames (narration, data, tokens, its end) so that anyone may watch
#: it from the start (`jobs watch`): of one job, its first JOB_RECORD_HEAD_BYTES and then the most
#: recent, up to JOB_RECORD_BYTES in all (what falls between is dropped, and a replay says so).
JOB_RECORD_BYTES = 1 << 20
JOB_RECORD_HEAD_BYTES = 256 << 10
#: Finished jobs a server remembers (job listings; a queen's watches, across its restarts), and
#: the bytes of their frames a queen keeps in all; past either, the oldest are forgotten.
FINISHED_JOBS_KEPT = 200
FINISHED_RECORDS_BYTES = 64 << 20
#: The bytes of frames a queen keeps of all its jobs at once, running and finished: past it, a
#: running job keeps its head (while there is room) and drops its most recent frames.
JOB_RECORDS_BYTES = 256 << 20
#: Jobs one worker runs at once: sequences of its model's batch (llama.cpp's server also
#: defaults to 4). Each takes a KV cache; the default context budget is shared between them.
DEFAULT_SLOTS = 4
MAX_SLOTS = 64
#: The most tokens one inference may ask to generate.
MAX_GENERATED_TOKENS = 32_768
#: The contexts a worker may load a model with, in tokens.
MIN_CONTEXT_TOKENS = 64
MAX_CONTEXT_TOKENS = 1 << 20
