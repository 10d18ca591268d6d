"""What a queen keeps of its jobs: each job's frames, so that anyone may watch it from the start
(`jobs watch`), and the finished jobs it remembers, in a journal on disk across its restarts.

A **record** holds one job's streamed frames (narration, data, tokens) as their kind and body,
without the job id, which a watcher's own job puts back: the first JOB_RECORD_HEAD_BYTES, then
the most recent up to JOB_RECORD_BYTES in all, and always the job's terminal frame. Frames
dropped between the two are counted, and a replay says how many. Watchers of a running job are
called with each new frame as it is recorded, in the task that records it: a watcher sees the
same frames in the same order as the submitter.

The **history** remembers the last FINISHED_JOBS_KEPT finished jobs (their summaries, and the
frames of the newest up to FINISHED_RECORDS_BYTES in all). A queen's history is journaled: a
line (a msgpack map) when a job starts and one with its record when it ends, appended and
flushed (a killed queen loses nothing it wrote; a power cut may lose the last lines), and
rewritten whole, atomically, when the queen starts and when the journal has grown to twice
what it keeps. A job that started but never ended in the journal ran when its queen died: it is
remembered as ended with UNAVAILABLE, which is what its submitter was told.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import trio

from rbee_mesh.files import write_atomic
from rbee_mesh.protocol import (
    TERMINAL_KINDS,
    Accepted,
    Error,
    ErrorCode,
    Kind,
    Message,
    ProtocolError,
    decode,
    encode,
)
from rbee_mesh.protocol.codec import HEADER, batch_length
from rbee_mesh.protocol.constants import (
    FINISHED_JOBS_KEPT,
    FINISHED_RECORDS_BYTES,
    JOB_RECORD_BYTES,
    JOB_RECORD_HEAD_BYTES,
    JOB_RECORDS_BYTES,
)

log = logging.getLogger("rbee_mesh.jobs")

#: A frame as a record keeps it: its kind and its body (the job id is the watcher's).
Frame = tuple[Kind, bytes]
#: Called with each frame recorded after it started watching.
Watcher = Callable[[Kind, bytes], None]

#: What the last words of a job whose queen died mid-way say (its submitter was told UNAVAILABLE).
LOST_WITH_THE_QUEEN = (
    "the queen stopped (killed or crashed) while this job ran; the job ended with it "
    "(its hive cancels what its queen no longer follows)"
)


@dataclass(eq=False)
class RecordBudget:
    """The bytes of frames all of a server's records may hold at once, running jobs' and
    finished ones': past it, a running job keeps its head and drops its most recent frames."""

    limit: int = JOB_RECORDS_BYTES
    used: int = 0


@dataclass(eq=False)
class JobRecord:
    """One job's frames, bounded, and its end."""

    accepted: Accepted
    budget: RecordBudget = field(default_factory=RecordBudget)
    head: list[Frame] = field(default_factory=list)
    tail: deque[Frame] = field(default_factory=deque)
    head_bytes: int = 0
    tail_bytes: int = 0
    #: Frames recorded in all (kept or dropped): the index the next one gets.
    count: int = 0
    #: Messages recorded in all (a BATCH frame holds several), and in the tail as kept now.
    messages: int = 0
    tail_messages: int = 0
    #: Whether frames still go to the head (until the first that does not fit there).
    head_open: bool = True
    #: Whether the frames were forgotten since (an old finished job's, or one from before a
    #: queen's restart that had none written), though its end is remembered.
    forgotten: bool = False
    #: Its terminal frame once it has ended, kept encoded: a finished job's result decoded (a
    #: `status` of 1,000 hives is a million objects) would stay for the garbage collector to walk
    #: at every full collection, for as long as the job is remembered.
    end_frame: Frame | None = None
    watchers: list[Watcher] = field(default_factory=list)
    ended: trio.Event = field(default_factory=trio.Event)

    @property
    def job_id(self) -> str:
        return self.accepted.job_id

    @property
    def size(self) -> int:
        return self.head_bytes + self.tail_bytes

    def append(self, kind: Kind, body: bytes) -> None:
        """Record a streamed frame and pass it to every watcher."""
        self.count += 1
        held = messages_in(kind, body)
        self.messages += held
        size = len(body)
        budget = self.budget
        budget.used += size
        if (
            self.head_open
            and self.head_bytes + size <= JOB_RECORD_HEAD_BYTES
            and budget.used <= budget.limit
        ):
            self.head.append((kind, body))
            self.head_bytes += size
        else:
            self.head_open = False
            self.tail.append((kind, body))
            self.tail_bytes += size
            self.tail_messages += held
            while self.tail and (
                self.head_bytes + self.tail_bytes > JOB_RECORD_BYTES or budget.used > budget.limit
            ):
                dropped_kind, dropped = self.tail.popleft()
                self.tail_bytes -= len(dropped)
                self.tail_messages -= messages_in(dropped_kind, dropped)
                budget.used -= len(dropped)
        for watcher in self.watchers:
            watcher(kind, body)

    def end(self, kind: Kind, body: bytes) -> None:
        """The job ended with this terminal frame (its kind and encoded body)."""
        self.end_frame = (kind, body)
        self.watchers.clear()
        self.ended.set()

    @property
    def terminal(self) -> Message | None:
        """Its terminal message, decoded (None while it runs)."""
        if self.end_frame is None:
            return None
        kind, body = self.end_frame
        return decode([HEADER, bytes([kind]), self.job_id.encode("ascii"), body])

    @property
    def messages_before_tail(self) -> int:
        """The messages recorded before the oldest frame the tail keeps (head, and dropped)."""
        return self.messages - self.tail_messages

    def frames_from(self, index: int) -> Iterator[tuple[int, Frame | None]]:
        """The frames kept from `index` on, each with its index; a gap of dropped frames comes
        as (the index after it, None)."""
        if index < len(self.head):
            for i in range(index, len(self.head)):
                yield i + 1, self.head[i]
            index = len(self.head)
        first_tail = self.count - len(self.tail)
        if index < first_tail:
            yield first_tail, None
            index = first_tail
        for i in range(index - first_tail, len(self.tail)):
            yield first_tail + i + 1, self.tail[i]

    def forget_frames(self) -> None:
        self.budget.used -= self.size
        self.head, self.tail = [], deque()
        self.head_bytes = self.tail_bytes = 0
        self.forgotten = True

    # ---- the journal's form ------------------------------------------------------------------

    def to_journal(self) -> dict[str, Any]:
        assert self.end_frame is not None
        kind, body = self.end_frame
        return {
            "accepted": self.accepted.to_wire(),
            "head": [[int(k), b] for k, b in self.head],
            "tail": [[int(k), b] for k, b in self.tail],
            "count": self.count,
            "messages": self.messages,
            "forgotten": self.forgotten,
            "terminal": [int(kind), body],
        }

    @classmethod
    def from_journal(cls, job_id: str, entry: dict[str, Any], budget: RecordBudget) -> JobRecord:
        """Raises ProtocolError, KeyError, TypeError or ValueError for an entry it cannot read."""
        accepted = Accepted.from_wire(entry["accepted"], "ACCEPTED", job_id=job_id)
        kind, body = entry["terminal"]
        kind, body = Kind(kind), bytes(body)
        if kind not in TERMINAL_KINDS:
            raise ValueError(f"a {kind.name} frame cannot end a job")
        decode([HEADER, bytes([kind]), job_id.encode("ascii"), body])  # (checked, and kept packed)
        head = [(Kind(k), bytes(b)) for k, b in entry["head"]]
        tail = deque((Kind(k), bytes(b)) for k, b in entry["tail"])
        record = cls(
            accepted, budget, head, tail, head_bytes=sum(len(b) for _, b in head),
            tail_bytes=sum(len(b) for _, b in tail), count=int(entry["count"]), head_open=False,
            forgotten=bool(entry["forgotten"]),
            # (a journal from before BATCH frames held one message a frame)
            messages=int(entry.get("messages", entry["count"])),
            tail_messages=sum(messages_in(k, b) for k, b in tail),
        )  # fmt: skip
        budget.used += record.size
        record.end(kind, body)
        return record


def messages_in(kind: Kind, body: bytes) -> int:
    """How many messages a recorded frame holds: a BATCH its frames, any other one."""
    return batch_length(body) if kind is Kind.BATCH else 1


@dataclass(eq=False)
class EndedJob:
    summary: dict[str, Any]
    #: Its frames and end, where a record was kept (a queen's jobs).
    record: JobRecord | None


class JobHistory:
    """The finished jobs a server remembers, the newest last; journaled to `journal` if given."""

    def __init__(
        self,
        limit: int = FINISHED_JOBS_KEPT,
        *,
        records: bool = False,
        journal: Path | None = None,
        records_bytes: int = FINISHED_RECORDS_BYTES,
    ) -> None:
        """`records`: keep each job's frames (a queen: `jobs watch`)."""
        self.limit = limit
        self.records = records or journal is not None
        self.records_bytes = records_bytes
        #: Shared by every record, the running jobs' (the server makes them) and these.
        self.budget = RecordBudget()
        self._ended: OrderedDict[str, EndedJob] = OrderedDict()
        self._kept_bytes = 0
        #: Jobs started and not ended yet, as their journal lines say them.
        self._running: dict[str, dict[str, Any]] = {}
        self._path = journal
        self._file: BinaryIO | None = None
        self._written = 0
        self._failed = False
        if journal is not None:
            self._load(journal)
            self._rewrite()

    def __iter__(self) -> Iterator[EndedJob]:
        return iter(self._ended.values())

    def get(self, job_id: str) -> EndedJob | None:
        return self._ended.get(job_id)

    def started(self, summary: dict[str, Any]) -> None:
        if self._path is not None:
            self._running[summary["id"]] = summary
            self._append({"start": summary})

    def ended(self, summary: dict[str, Any], record: JobRecord | None) -> None:
        self._add(EndedJob(summary, record))
        if self._path is not None:
            self._running.pop(summary["id"], None)
            self._append({"end": _journal_entry(summary, record)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _add(self, ended: EndedJob) -> None:
        self._ended[ended.summary["id"]] = ended
        if ended.record is not None:
            self._kept_bytes += ended.record.size
        while len(self._ended) > self.limit:
            _, old = self._ended.popitem(last=False)
            if old.record is not None:
                self._kept_bytes -= old.record.size
                old.record.forget_frames()
        for old in self._ended.values():  # the oldest first
            if self._kept_bytes <= self.records_bytes:
                break
            if old.record is not None and not old.record.forgotten:
                self._kept_bytes -= old.record.size
                old.record.forget_frames()

    # ---- the journal ---------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read the job journal %s (%s); starting without it", path, exc)
            return
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
        unpacker.feed(data)
        read = 0
        try:
            for entry in unpacker:
                self._replay(entry)
                read = unpacker.tell()
        except Exception as exc:  # a torn last line (a crash mid-write), or damage
            log.warning(
                "the job journal %s is unreadable after byte %d (%s); the rest is dropped",
                path, read, type(exc).__name__,
            )  # fmt: skip
        for summary in self._running.values():  # they ran when the queen died
            self._add(_lost(summary))
        self._running.clear()

    def _replay(self, entry: Any) -> None:
        if not isinstance(entry, dict):
            raise ValueError("not a map")
        if "start" in entry:
            summary = dict(entry["start"])
            self._running[str(summary["id"])] = summary
            return
        end = entry["end"]
        summary = dict(end["summary"])
        job_id = str(summary["id"])
        self._running.pop(job_id, None)
        record = None
        if end.get("record") is not None:
            try:
                record = JobRecord.from_journal(job_id, end["record"], self.budget)
            except (ProtocolError, KeyError, TypeError, ValueError) as exc:
                log.warning("the journal's record of job %s is unreadable: %s", job_id, exc)
        self._add(EndedJob(summary, record))

    def _rewrite(self) -> None:
        """Write the journal anew: what is remembered, and the jobs running now."""
        assert self._path is not None
        self.close()
        entries = [{"end": _journal_entry(e.summary, e.record)} for e in self._ended.values()]
        entries += [{"start": summary} for summary in self._running.values()]
        packed = [msgpack.packb(entry, use_bin_type=True) for entry in entries]
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path, packed)
            self._file = self._path.open("ab")
        except OSError as exc:
            self._journal_failed(exc)
            return
        self._written = sum(map(len, packed))

    def _append(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = msgpack.packb(entry, use_bin_type=True)
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            self._journal_failed(exc)
            return
        self._written += len(line)
        if self._written > 2 * (self.records_bytes + self.limit * 1024):
            self._rewrite()

    def _journal_failed(self, exc: OSError) -> None:
        """A full or read-only disk: jobs run on; what they did is not remembered across a
        restart (said once)."""
        if not self._failed:
            log.error(
                "cannot write the job journal %s (%s): job history will not survive a restart",
                self._path, exc,
            )  # fmt: skip
            self._failed = True
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _journal_entry(summary: dict[str, Any], record: JobRecord | None) -> dict[str, Any]:
    return {"summary": summary, "record": record.to_journal() if record is not None else None}


def _lost(summary: dict[str, Any]) -> EndedJob:
    """A job that started in the journal and never ended: it ran when its queen died."""
    summary = dict(summary)
    job_id = str(summary["id"])
    error = Error(job_id=job_id, code=ErrorCode.UNAVAILABLE, message=LOST_WITH_THE_QUEEN)
    ref, deadline_s = summary.pop("ref", None), summary.pop("deadline_s", None)
    summary = {
        **summary,
        "state": "failed",
        "error": f"{error.code}: {error.message}",
        "duration_s": None,
    }
    accepted = Accepted(
        job_id=job_id,
        ref=str(ref or "lost"),
        op=str(summary["op"]),
        deadline_s=float(deadline_s or 1.0),
    )
    record = JobRecord(accepted, head_open=False, forgotten=True)
    record.end(Kind.ERROR, encode(error)[3])
    return EndedJob(summary, record)
