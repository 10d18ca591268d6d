"""What `rbee-mesh`'s commands run, in trio, once they run: a job submitted to a queen and
rendered live, a chat, a mesh made for one command, waiting for a daemon to answer.

A module apart from the command tree (cli.py), which imports it in a command's body: the tree
starts without trio, zmq or msgpack (`--help`, `--version`), and a command that talks to a queen
imports the job client and what it needs, and only that (a queen and a hive only for a mesh made
for one command).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from rbee_mesh.actors.jobclient import ClientConfig, ClientJob, JobClient, ServerUnreachable
from rbee_mesh.actors.keeper import daemon
from rbee_mesh.actors.keeper.client import open_keeper
from rbee_mesh.actors.keeper.exits import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_FOR_CODE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
)
from rbee_mesh.actors.keeper.render import JsonRenderer, Renderer
from rbee_mesh.actors.trust import Trust
from rbee_mesh.protocol import Cancelled, Done, Error, Message, Operation, Ping
from rbee_mesh.protocol import operations as ops
from rbee_mesh.transport import local_endpoint_for

if TYPE_CHECKING:
    from rbee_mesh.actors.keeper.cli import Cli


def exit_code_for(terminal: Message | None) -> int:
    match terminal:
        case Done():
            return EXIT_OK
        case Error():
            return EXIT_FOR_CODE.get(terminal.code, EXIT_FAILED)
        case Cancelled():
            return EXIT_CANCELLED
    return EXIT_FAILED


async def run_job(
    endpoint: str,
    op: Operation,
    renderer: Renderer,
    timeout_s: float | None,
    trust: Trust,
    detach: bool = False,
) -> int:
    """Submit `op` to the queen at `endpoint`, render its events live; its exit code. With
    `detach`, only until it is accepted: it runs on without this keeper."""
    try:
        async with open_keeper(endpoint, trust=trust) as keeper:
            if detach:
                return await submit_detached(keeper, op, renderer, timeout_s=timeout_s)
            return await stream_job(keeper, op, renderer, timeout_s=timeout_s)
    except ServerUnreachable as exc:
        renderer.problem(exc.code, exc.message)
        return EXIT_UNAVAILABLE


async def submit_detached(
    keeper: JobClient, op: Operation, renderer: Renderer, *, timeout_s: float | None = None
) -> int:
    """Submit `op` to run on after this keeper leaves: its id on stdout (JSON: its ACCEPTED),
    or its refusal."""
    job = await keeper.submit(op, timeout_s=timeout_s, keep=True)
    first = await job.__anext__()
    renderer.event(first)
    if job.accepted is None:  # refused: that was its end
        return exit_code_for(job.terminal)
    if not isinstance(renderer, JsonRenderer):
        print(job.job_id, flush=True)
        renderer.note(f"job {job.job_id} runs on; `rbee-mesh jobs watch {job.job_id}` follows it")
    return EXIT_OK


async def stream_job(
    keeper: JobClient, op: Operation, renderer: Renderer, *, timeout_s: float | None = None
) -> int:
    """Run one job to its end, rendering every event. Ctrl-C cancels it; a second one quits."""
    job = await keeper.submit(op, timeout_s=timeout_s)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_interrupt, job, renderer, nursery.cancel_scope)
        async for message in job:
            renderer.event(message)
        nursery.cancel_scope.cancel()
    if job.terminal is None:  # a second Ctrl-C: stop waiting for the queen's answer
        return EXIT_CANCELLED
    return exit_code_for(job.terminal)


async def _cancel_on_interrupt(job: ClientJob, renderer: Renderer, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        await signals.__anext__()
        if job.op.NAME == "job_watch":
            renderer.note("leaving; the job runs on (Ctrl-C again to stop waiting)")
        else:
            renderer.note(f"cancelling job {job.job_id} (Ctrl-C again to stop waiting)")
        await job.cancel("interrupted by the user (Ctrl-C)")
        await signals.__anext__()
        scope.cancel()


async def run_chat(cli: Cli, turn: ops.Infer) -> int:
    """`rbee-mesh chat`, with `turn` the settings of every turn; its exit code."""
    renderer = cli.renderer()
    try:
        async with _keeper_here(cli, renderer) as keeper:
            from rbee_mesh.actors.keeper.chat import chat_session

            return await chat_session(keeper, turn, renderer)
    except ServerUnreachable as exc:
        renderer.problem(exc.code, exc.message)
        return EXIT_UNAVAILABLE


async def run_here(cli: Cli, op: Operation, timeout_s: float | None) -> int:
    """Run one job on a mesh that lives only as long as this command."""
    renderer = cli.renderer()
    async with _keeper_here(cli, renderer) as keeper:
        return await stream_job(keeper, op, renderer, timeout_s=timeout_s)


@asynccontextmanager
async def _keeper_here(cli: Cli, renderer: Renderer) -> AsyncIterator[JobClient]:
    """A keeper of the queen this command talks to; with none running (and none named or
    joined), of a queen started in this process for the command, with the hive daemon of this
    machine if one runs, else this machine's hive integrated."""
    if cli.queen_known:
        async with open_keeper(cli.endpoint, trust=cli.trust) as keeper:
            yield keeper
        return
    from rbee_mesh.actors.mesh import mesh_for_one_command  # a queen and a hive: only here

    hive = daemon.read_info("hive")
    where = f"the hive daemon at {hive.endpoint}" if hive else "this machine's hive, integrated"
    renderer.note(f"no queen is running: starting one in this process, with {where}")
    async with (
        mesh_for_one_command(daemon.state_dir(), hive.endpoint if hive else None) as queen,
        open_keeper(queen.listener.endpoint) as keeper,
    ):
        yield keeper


async def wait_until_serving(
    name: str, pid: int, poll: Callable[[], int | None], trust: Trust, timeout_s: float = 15.0
) -> daemon.DaemonInfo | None:
    """Wait for the daemon `pid` to record its endpoint and answer a ping there, as the node of
    `trust` (the daemon's own: one state directory)."""
    quick = ClientConfig(accept_timeout_s=1.0)
    with trio.move_on_after(timeout_s):
        while poll() is None:
            info = daemon.read_info(name)
            if info is not None and info.pid == pid:
                try:
                    endpoint = local_endpoint_for(info.endpoint)
                    async with open_keeper(endpoint, quick, trust) as keeper:
                        job = await keeper.submit(Ping())
                        async for _ in job:
                            pass
                        if isinstance(job.terminal, Done):
                            return info
                except ServerUnreachable:
                    pass
            await trio.sleep(0.05)
    return None
