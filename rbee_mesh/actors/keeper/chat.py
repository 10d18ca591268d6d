"""`rbee-mesh chat MODEL`: a conversation in the terminal, as `ollama run` has it.

Each line a person types is a chat turn (`Infer` with `chat`, and the turns so far as its
`history`), rendered by the worker with the model's own template and streamed back. Ctrl-C stops
the answer (the job is cancelled, the worker freed at once) and not the session; at the prompt
it says how to leave; `/bye` or Ctrl-D ends the session. With stdin not a terminal, all of it is
one prompt, answered once.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace

import trio

from rbee_mesh.actors.jobclient import ClientJob, JobClient
from rbee_mesh.actors.keeper.render import Renderer
from rbee_mesh.protocol import Done, Infer, Token

#: What ends a session, typed at the prompt.
BYE = "/bye"
PROMPT = ">>> "


async def chat_session(keeper: JobClient, turn: Infer, renderer: Renderer) -> int:
    """Run the session (interactive when stdin is a terminal); the exit code."""
    if not sys.stdin.isatty():
        text = (await trio.to_thread.run_sync(sys.stdin.read)).strip()
        if not text:
            renderer.problem("INVALID_REQUEST", "nothing to say: stdin was empty")
            return 2
        job = await keeper.submit(replace(turn, prompt=text))
        async for message in job:
            renderer.event(message)
        return 0 if isinstance(job.terminal, Done) else 1
    return await _Session(keeper, turn, renderer).run()


class _Session:
    def __init__(self, keeper: JobClient, turn: Infer, renderer: Renderer) -> None:
        self.keeper = keeper
        self.turn = turn
        self.renderer = renderer
        self.history: list[tuple[str, str]] = []
        #: What a Ctrl-C interrupts now: the answer being streamed, or the line being read.
        self.answering: ClientJob | None = None
        self.reading: trio.CancelScope | None = None

    async def run(self) -> int:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_interrupt)
                await self._converse(stdin)
                nursery.cancel_scope.cancel()
        finally:
            await stdin.aclose()
            os.set_blocking(sys.stdin.fileno(), True)  # the terminal, as it was
        return 0

    async def _converse(self, stdin: trio.lowlevel.FdStream) -> None:
        self.renderer.note(f"chatting with {self.turn.model}: {BYE} or Ctrl-D ends the chat")
        pending = b""
        while True:
            print(PROMPT, end="", flush=True)
            line = None
            with trio.CancelScope() as self.reading:
                while b"\n" not in pending:
                    chunk = await stdin.receive_some(4096)
                    if not chunk:  # Ctrl-D
                        print()
                        return
                    pending += chunk
                raw, _, pending = pending.partition(b"\n")
                line = raw.decode(errors="replace").strip()
            self.reading = None
            if line is None:  # Ctrl-C at the prompt
                print(f"\n(to leave: {BYE} or Ctrl-D)")
                continue
            if line == BYE:
                return
            if line:
                await self._answer(line)

    async def _answer(self, line: str) -> None:
        op = replace(self.turn, prompt=line, history=tuple(self.history))
        job = await self.keeper.submit(op)
        self.answering = job
        text = []
        try:
            async for message in job:
                if isinstance(message, Token):
                    text.append(message.text)
                self.renderer.event(message)
        finally:
            self.answering = None
        if isinstance(job.terminal, Done):
            self.history += [("user", line), ("assistant", "".join(text))]

    async def _on_interrupt(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                if self.answering is not None:
                    await self.answering.cancel("stopped by the user (Ctrl-C)")
                elif self.reading is not None:
                    self.reading.cancel()
