"""One inference job in a worker: generate in a thread, stream TOKEN frames, say how it went.

The backend generates in a thread (`trio.to_thread`), so the worker's trio loop keeps serving
frames and heartbeats. The thread appends each piece of text the backend yields to a deque and
wakes trio with the trio token's `run_sync_soon` only if no wake-up is already pending: the
thread never waits for trio. (Measured: `trio.from_thread.run_sync` per token costs the
generating thread ~80 us and a memory channel ~130 us; this costs ~0.1 us while trio is behind
and ~10 us when every token wakes it.) trio sends what has accumulated as one TOKEN frame (`seq`
= index of its first piece, `count` pieces, `text` their concatenation), at most one frame per
FLUSH_INTERVAL_S (16 ms, a display frame; the first piece and the last go at once), so per-frame
costs never limit tokens/s nor take much CPU from the generating threads.
A piece is one sampled token, except where the backend holds text back (a character split over
several tokens, text that may start a stop sequence) and yields it with a later token.

A job stops early when its job server cancels it (CANCEL, its deadline, the worker stopping):
the thread checks a flag after every piece and closes the generator, so it stops within one
token, and the job ends once the thread has stopped, so that the model is free by then.

DONE's result: `{"text", "usage": {"prompt_tokens", "generated_tokens", "ttft_s",
"tokens_per_s", "duration_s"}, "backend", "worker", "finish_reason", "context", "cut_by"}`.
`duration_s` runs from the start of the job to the last token, `ttft_s` to the first (the queen
replaces it with the time from the submission, and keeps this one as `worker_ttft_s`); `cut_by`
says what a "length" ran out of ("max_tokens" or "context"). A backend yields text only, so
`finish_reason` is inferred: "length" when max_tokens (or the context) ran out, "eos" when it
ended sooner and no stop sequence was given, "end" when it ended sooner and one was.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from rbee_mesh.actors.jobserver import ServerJob
from rbee_mesh.actors.narration import narrate
from rbee_mesh.protocol import Cancelled, ErrorCode, Infer, MeshError, ProtocolError, Token

if TYPE_CHECKING:
    # Only a worker process needs the inference libraries (numpy, gguf, the backends).
    from rbee_mesh.inference.backends import GenerationParams, LoadedModel
    from rbee_mesh.inference.native import TextStream

#: Tokens that arrive within this long of the previous TOKEN frame wait and share the next one:
#: a display frame, which nobody reading sees; the first token and the last go at once. Every
#: frame costs CPU at each hop, taken from the generating threads on a small machine: with a
#: frame per token (1 ms) SmolLM2 on 2 vCPUs kept 0.83-0.91 of its direct rate through the API,
#: with 16 ms 0.92-0.98 (docs/benchmarks.md).
FLUSH_INTERVAL_S = 0.016


class TokenStream:
    """Token texts from a generating thread to the trio task that sends them, never blocking it.

    `put` runs in the thread; everything else in trio. The thread wakes trio with the trio
    token's `run_sync_soon` only when trio waits for a token and no wake-up is pending yet, so a
    burst of tokens costs one wake-up, and tokens that arrive while trio waits out the flush
    interval cost none.
    """

    def __init__(self, trio_token: trio.lowlevel.TrioToken) -> None:
        self._trio_token = trio_token
        self._pending: deque[str] = deque()
        #: True while a wake-up is scheduled, or not needed (trio drains on a timer anyway).
        self._quiet = False
        self._wakeup = trio.Event()
        self._closed = trio.Event()

    def put(self, text: str) -> None:
        """Called by the generating thread for each token."""
        self._pending.append(text)
        if not self._quiet:
            self._quiet = True
            self._trio_token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._quiet = False
        self._wakeup.set()

    def close(self) -> None:
        """No more tokens: the generating thread has returned."""
        self._closed.set()
        self._wakeup.set()

    async def next_batch(self, not_before: float) -> list[str] | None:
        """Every token that has arrived, once one has and `not_before` (trio time) has passed;
        None once the stream is closed and drained. Closing skips the wait for `not_before`."""
        while not self._pending:
            if self._closed.is_set():
                return None
            self._wakeup = trio.Event()
            self._quiet = False
            # A token put before `_quiet` was cleared scheduled no wake-up: look once more.
            if self._pending:
                break
            await self._wakeup.wait()
        if trio.current_time() < not_before:
            self._quiet = True  # whatever arrives meanwhile goes out with this batch
            with trio.move_on_at(not_before):
                await self._closed.wait()  # the last batch goes at once
        batch: list[str] = []
        while self._pending:  # popleft, never clear(): the thread may be appending meanwhile
            batch.append(self._pending.popleft())
        return batch


@dataclass(eq=False)
class Generation:
    """One job's generation. Fields marked (thread) are written by the generating thread only."""

    op: Infer
    model: LoadedModel
    stream: TokenStream
    #: The text the model continues: the op's prompt, or a chat rendered with its template.
    prompt: str
    started: float = field(default_factory=time.perf_counter)
    #: Set to stop the generating thread, which checks it after every token.
    stop: threading.Event = field(default_factory=threading.Event)
    stop_requested: float | None = None
    sampled_at_stop: int = 0
    #: Set once the generating thread has returned.
    done: bool = False
    #: Why the job must fail although generation went fine (text that cannot be sent).
    failure: str = ""
    #: What the generating thread raised (the backend's reason), re-raised by the job.
    error: Exception | None = None
    #: The backend's stream of this job's text, once started; it counts the tokens sampled.
    tokens: TextStream | None = None  # (thread)
    #: Pieces of text the backend yielded: the unit of TOKEN frames' `seq` and `count`.
    pieces: int = 0  # (thread)
    first_token: float | None = None  # (thread)
    last_token: float | None = None  # (thread)
    #: The generated text, once generation has ended.
    text: str = ""

    @property
    def sampled(self) -> int:
        """Tokens the backend has sampled so far (the pieces of text it yielded are fewer when
        it held text back: a character split over tokens, the possible start of a stop)."""
        return 0 if self.tokens is None else self.tokens.sampled

    def request_stop(self) -> None:
        if self.stop_requested is None:
            self.stop_requested = time.perf_counter()
            self.sampled_at_stop = self.sampled
        self.stop.set()


def generate_in_thread(run: Generation, params: GenerationParams) -> None:
    """Iterate the backend's generator and hand each token to trio; stop when `run.stop` is set.

    Runs in a thread. The backend yields once per sampled token (text it holds back comes as
    ""), and the flag is checked after each, so a stop costs at most the token being computed
    when it was requested.
    """
    if run.stop.is_set():
        return
    tokens = run.tokens = run.model.generate(run.prompt, params)
    try:
        for text in tokens:
            if text:
                now = time.perf_counter()
                if run.first_token is None:
                    run.first_token = now
                run.last_token = now
                run.pieces += 1
                run.stream.put(text)
            if run.stop.is_set():
                return
    finally:
        tokens.close()


async def generate(job: ServerJob, op: Infer, model: LoadedModel, worker_id: str) -> dict[str, Any]:
    """Run `op` on `model` as `job`: stream its tokens, return DONE's result. Cancelled (by the
    job's server), it stops the thread within a token, narrates how soon, and re-raises."""
    from rbee_mesh.inference.backends import GenerationParams
    from rbee_mesh.inference.chat import chat_prompt, one_turn  # Jinja: in workers only

    params = GenerationParams.from_op(op)
    prompt = op.prompt
    if op.chat or op.system is not None or op.history:
        turn = one_turn(op.prompt, op.system, op.history)
        prompt, template = await trio.to_thread.run_sync(chat_prompt, model.info.path, turn)
        which = (
            "the model's own chat template"
            if template.own
            else "ChatML (the model carries no chat template of its own)"
        )
        narrate("generate", f"a chat turn, rendered with {which}")
    token = trio.lowlevel.current_trio_token()
    run = Generation(op=op, model=model, stream=TokenStream(token), prompt=prompt)
    prompt_tokens = await trio.to_thread.run_sync(model.count_tokens, prompt)
    narrate("generate", f"generating with {model.backend}, prompt {prompt_tokens} tokens")
    ended = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_tokens, run, job)
            try:
                async with trio.open_nursery() as watch:
                    watch.start_soon(_stop_when_cancelled, run)
                    try:
                        # Not abandoned on cancel: the model stays in use until the thread
                        # returns, which the stop flag bounds to one token.
                        await trio.to_thread.run_sync(generate_in_thread, run, params)
                    except Exception as exc:  # re-raised below, not wrapped in a group
                        run.error = exc
                    finally:
                        run.done = True
                        watch.cancel_scope.cancel()
            finally:
                run.stream.close()
        ended = True
    finally:
        if not ended:  # cancelled: by its submitter, its deadline, the worker stopping
            _narrate_stop(run, "cancelled" if isinstance(job.abort, Cancelled) else "stopped")
    if run.error is not None:
        raise run.error
    if run.failure:
        raise MeshError(ErrorCode.INTERNAL, run.failure)
    generated = run.sampled
    end = run.last_token if run.last_token is not None else time.perf_counter()
    duration = end - run.started
    rate = generated / duration if duration > 0 else 0.0
    narrate("generate", f"{generated} tokens in {duration:.3f} s ({rate:.1f} tok/s)")
    ttft = None if run.first_token is None else round(run.first_token - run.started, 6)
    return {
        "text": run.text,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated,
            "ttft_s": ttft,
            "tokens_per_s": round(rate, 3),
            "duration_s": round(duration, 6),
        },
        "backend": model.backend,
        "worker": worker_id,
        "finish_reason": _finish_reason(run, generated, prompt_tokens),
        "context": model.n_ctx,
        # What a "length" ran out of: the tokens asked for, or the model's context.
        "cut_by": _cut_by(run, generated, prompt_tokens),
    }


async def _stop_when_cancelled(run: Generation) -> None:
    """The job was cancelled from outside (its server aborted it): stop the thread."""
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        if not run.done:
            run.request_stop()
        raise


async def _send_tokens(run: Generation, job: ServerJob) -> None:
    """TOKEN frames from the stream: coalesced, in order, none lost or repeated."""
    seq = 0
    sent_at = -math.inf
    parts: list[str] = []
    while (batch := await run.stream.next_batch(sent_at + FLUSH_INTERVAL_S)) is not None:
        parts += batch
        # Once the job is stopped nobody wants its text: its terminal frame comes next.
        if not run.stop.is_set():
            try:
                job.emit(Token(job_id=job.id, seq=seq, text="".join(batch), count=len(batch)))
            except ProtocolError as exc:
                run.failure = f"the backend generated text that cannot be sent: {exc.message}"
                run.request_stop()
            sent_at = trio.current_time()
        seq += len(batch)
    run.text = "".join(parts)


def _narrate_stop(run: Generation, why: str) -> None:
    if run.stop_requested is None:
        return
    sampled = run.sampled
    after = sampled - run.sampled_at_stop
    waited_ms = (time.perf_counter() - run.stop_requested) * 1000
    narrate(
        "generate",
        f"{why} after {sampled} tokens; generation stopped {after} token(s) after the "
        f"request, {waited_ms:.1f} ms later",
    )


def _cut_by(run: Generation, generated: int, prompt_tokens: int) -> str | None:
    room = run.model.n_ctx - prompt_tokens
    if generated < min(run.op.max_tokens, room):
        return None
    return "context" if room < run.op.max_tokens else "max_tokens"


def _finish_reason(run: Generation, generated: int, prompt_tokens: int) -> str:
    """Why a generation that ran to its end ended, as far as the worker can know.

    A backend ends at max_tokens or a full context ("length"), at the end-of-sequence token, or
    at a stop sequence, and yields only text. Without stop sequences a shorter generation met
    the end-of-sequence token ("eos"); with them it may have met either ("end").
    """
    budget = min(run.op.max_tokens, run.model.n_ctx - prompt_tokens)
    if generated >= budget:
        return "length"
    return "end" if run.op.stop else "eos"
