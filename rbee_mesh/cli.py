"""`rbee-mesh`: the keeper, the command line a person types into.

Exit codes (docs/cli.md): 0 done; 1 the job failed; 2 invalid usage or request; 3 the queen (or
the actor a job needs) is unreachable; 4 not found; 5 timed out; 130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import trio

from rbee_mesh import __version__, daemon
from rbee_mesh.actors.keeper import JobHandle, Keeper, KeeperConfig, QueenUnreachable, open_keeper
from rbee_mesh.mesh import DEFAULT_QUEEN_BIND, integrated_mesh, serve_queen_forever
from rbee_mesh.protocol import (
    Cancelled,
    Done,
    Error,
    ErrorCode,
    JobCancel,
    JobList,
    MeshError,
    Message,
    Operation,
    Ping,
    ProtocolError,
    Status,
)
from rbee_mesh.render import HumanRenderer, JsonRenderer, Renderer, format_table
from rbee_mesh.transport import EndpointError, local_endpoint_for

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_TIMEOUT = 5
EXIT_CANCELLED = 130

_EXIT_FOR_CODE = {
    ErrorCode.INVALID_REQUEST: EXIT_USAGE,
    ErrorCode.UNSUPPORTED_VERSION: EXIT_USAGE,
    ErrorCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    ErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
    ErrorCode.TIMEOUT: EXIT_TIMEOUT,
    ErrorCode.CANCELLED: EXIT_CANCELLED,
}


def exit_code_for(terminal: Message | None) -> int:
    match terminal:
        case Done():
            return EXIT_OK
        case Error():
            return _EXIT_FOR_CODE.get(terminal.code, EXIT_FAILED)
        case Cancelled():
            return EXIT_CANCELLED
    return EXIT_FAILED


@dataclass
class Cli:
    """What every command shares: where the queen is and how to show things."""

    queen: str | None
    as_json: bool

    @property
    def endpoint(self) -> str:
        """--queen / RBEE_MESH_QUEEN, else the local queen daemon's endpoint, else the default."""
        if self.queen:
            return self.queen
        info = daemon.read_info("queen")
        return local_endpoint_for(info.endpoint if info else DEFAULT_QUEEN_BIND)

    def renderer(self) -> Renderer:
        return JsonRenderer() if self.as_json else HumanRenderer()

    def run_job(
        self,
        op: Operation,
        timeout_s: float | None = None,
    ) -> NoReturn:
        """Submit `op` to the queen, render its events live, exit with its outcome."""
        renderer = self.renderer()
        code = trio.run(_run_job, self.endpoint, op, renderer, timeout_s)
        sys.exit(code)


async def _run_job(
    endpoint: str, op: Operation, renderer: Renderer, timeout_s: float | None
) -> int:
    try:
        async with open_keeper(endpoint) as keeper:
            return await stream_job(keeper, op, renderer, timeout_s=timeout_s)
    except QueenUnreachable as exc:
        renderer.problem(exc.code, exc.message)
        return EXIT_UNAVAILABLE


async def stream_job(
    keeper: Keeper, op: Operation, renderer: Renderer, *, timeout_s: float | None = None
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


async def _cancel_on_interrupt(job: JobHandle, renderer: Renderer, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        await signals.__anext__()
        renderer.note(f"cancelling job {job.job_id} (Ctrl-C again to stop waiting)")
        await job.cancel("interrupted by the user (Ctrl-C)")
        await signals.__anext__()
        scope.cancel()


def _make(op_cls: type[Operation], **kwargs: Any) -> Operation:
    """Build an operation from command-line values; a bad value is a usage error (exit 2)."""
    try:
        return op_cls(**kwargs)
    except ProtocolError as exc:
        raise click.UsageError(exc.message) from None


# ---- the command tree ----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--queen",
    envvar="RBEE_MESH_QUEEN",
    metavar="ENDPOINT",
    help="Queen to talk to, e.g. tcp://10.0.0.5:7833 (env RBEE_MESH_QUEEN). "
    "Default: the queen started on this machine, else " + DEFAULT_QUEEN_BIND + ".",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Machine output: one JSON object per event per line on stdout.",
)
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: debug).")
@click.version_option(__version__, prog_name="rbee-mesh")
@click.pass_context
def main(ctx: click.Context, queen: str | None, as_json: bool, verbose: int) -> None:
    """rbee-mesh: every box on your LAN, GPU or CPU, as one LLM inference mesh.

    A queen runs jobs; hives (one per machine) hold models and workers; this command is the
    keeper, which submits jobs to the queen and shows their narration live.
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Cli(queen=queen, as_json=as_json)


pass_cli = click.make_pass_decorator(Cli)


@main.command()
@pass_cli
def demo(cli: Cli) -> None:
    """Run a whole mesh in this process and a few jobs through it, narrated live.

    Needs nothing running and no network: the queen and this keeper share the process and talk
    over the in-memory transport, with the same frames as over tcp.
    """
    sys.exit(trio.run(_demo, cli.renderer()))


async def _demo(renderer: Renderer) -> int:
    steps: list[tuple[str, Operation, float | None, type[Message]]] = [
        ("the state of the mesh", Status(), None, Done),
        ("narration streamed live from the queen", Ping(count=5, interval_s=0.2), None, Done),
        (
            "a job cancelled midway (as Ctrl-C does)",
            Ping(count=50, interval_s=0.1),
            None,
            Cancelled,
        ),
        ("a job that overruns its 0.5 s deadline", Ping(count=50, interval_s=0.1), 0.5, Error),
        ("every job so far, each ended by exactly one terminal frame", JobList(), None, Done),
    ]
    rows: list[dict[str, Any]] = []
    async with integrated_mesh() as queen, open_keeper(queen.listener.endpoint) as keeper:
        renderer.note(f"integrated mesh: queen on {queen.listener.endpoint} (in-process)")
        for title, op, timeout_s, expected in steps:
            renderer.note(f"\n== {title}: {op.NAME}")
            start = trio.current_time()
            job = await keeper.submit(op, timeout_s=timeout_s)
            accepted = trio.current_time()
            frames = 0
            async for message in job:
                frames += 1
                renderer.event(message)
                if expected is Cancelled and frames == 3:
                    await job.cancel("cancelled by the demo after 3 frames")
            rows.append(
                {
                    "job": job.job_id,
                    "op": op.NAME,
                    "ended": job.terminal.KIND.name if job.terminal else "?",
                    "as_expected": isinstance(job.terminal, expected),
                    "frames": frames,
                    "accepted_us": round((accepted - start) * 1e6),
                    "total_ms": round((trio.current_time() - start) * 1e3, 1),
                }
            )
    renderer.note("\n" + format_table(rows))
    return EXIT_OK if all(r["as_expected"] for r in rows) else EXIT_FAILED


@main.command()
@pass_cli
def status(cli: Cli) -> None:
    """The whole mesh at a glance: queen, hives, jobs."""
    cli.run_job(Status())


@main.command()
@click.option("-n", "--count", default=1, show_default=True, help="How many pongs to narrate.")
@click.option(
    "-i", "--interval", default=0.0, show_default=True, type=float, help="Seconds between pongs."
)
@click.option("--hive", metavar="HIVE", help="Ask this hive instead of the queen.")
@pass_cli
def ping(cli: Cli, count: int, interval: float, hive: str | None) -> None:
    """Check the path to the queen: it narrates COUNT pongs back."""
    cli.run_job(_make(Ping, count=count, interval_s=interval, hive=hive))


@main.group()
def jobs() -> None:
    """Jobs known to the queen."""


@jobs.command("list")
@click.option("--running", is_flag=True, help="Only jobs that are still running.")
@pass_cli
def jobs_list(cli: Cli, running: bool) -> None:
    """Running jobs and the most recent finished ones."""
    cli.run_job(JobList(include_finished=not running))


@jobs.command("cancel")
@click.argument("job_id")
@pass_cli
def jobs_cancel(cli: Cli, job_id: str) -> None:
    """Cancel the running job JOB_ID (any keeper's)."""
    cli.run_job(_make(JobCancel, job=job_id))


@main.group()
def queen() -> None:
    """Start, stop and inspect the queen on this machine."""


@queen.command("start")
@click.option(
    "--bind",
    default=DEFAULT_QUEEN_BIND,
    show_default=True,
    metavar="ENDPOINT",
    help="Where keepers reach the queen. tcp://0.0.0.0:7833 admits other machines.",
)
@click.option("--foreground", is_flag=True, help="Stay attached and log to stderr.")
@pass_cli
def queen_start(cli: Cli, bind: str, foreground: bool) -> None:
    """Start the queen (a daemon, unless --foreground) and return once it answers."""
    if foreground:
        logging.getLogger("rbee_mesh").setLevel(min(logging.INFO, logging.root.level))
        try:
            trio.run(serve_queen_forever, bind, True)
        except EndpointError as exc:
            _fail(cli, ErrorCode.UNAVAILABLE, f"cannot serve on {bind}: {exc}", EXIT_UNAVAILABLE)
        except KeyboardInterrupt:
            pass
        return
    running = daemon.read_info("queen")
    if running is not None:
        _say(
            cli,
            f"queen already running (pid {running.pid}) on {running.endpoint}",
            {
                "event": "queen",
                "state": "running",
                "pid": running.pid,
                "endpoint": running.endpoint,
                "started": False,
            },
        )
        return
    proc = daemon.spawn_detached("queen", ["queen", "start", "--foreground", "--bind", bind])
    info = trio.run(_wait_until_serving, proc.pid, proc.poll)
    if info is None:
        code = proc.poll()
        if code is None:
            daemon.stop_process(proc.pid, grace_s=2)
        why = f"exited with code {code}" if code is not None else "did not answer within 15s"
        _fail(
            cli,
            ErrorCode.UNAVAILABLE,
            f"the queen {why}. Its log ({daemon.log_path('queen')}) ends with:\n"
            f"{daemon.log_tail('queen')}",
            EXIT_UNAVAILABLE,
        )
    _say(
        cli,
        f"queen started (pid {info.pid}) on {info.endpoint}; log: {daemon.log_path('queen')}",
        {
            "event": "queen",
            "state": "running",
            "pid": info.pid,
            "endpoint": info.endpoint,
            "started": True,
        },
    )


async def _wait_until_serving(
    pid: int, poll: Callable[[], int | None], timeout_s: float = 15.0
) -> daemon.DaemonInfo | None:
    """Wait for the daemon `pid` to record its endpoint and answer a status job there."""
    quick = KeeperConfig(accept_timeout_s=1.0)
    with trio.move_on_after(timeout_s):
        while poll() is None:
            info = daemon.read_info("queen")
            if info is not None and info.pid == pid:
                try:
                    async with open_keeper(local_endpoint_for(info.endpoint), quick) as keeper:
                        job = await keeper.submit(Status())
                        async for _ in job:
                            pass
                        if isinstance(job.terminal, Done):
                            return info
                except QueenUnreachable:
                    pass
            await trio.sleep(0.05)
    return None


@queen.command("stop")
@pass_cli
def queen_stop(cli: Cli) -> None:
    """Stop the queen on this machine: its jobs end with UNAVAILABLE, then it exits."""
    info = daemon.read_info("queen")
    if info is None:
        _say(
            cli,
            "no queen is running on this machine",
            {"event": "queen", "state": "stopped", "pid": None},
        )
        return
    killed = daemon.stop_process(info.pid)
    daemon.remove_info("queen", info.pid)
    how = "killed after it ignored SIGTERM" if killed else "stopped"
    _say(
        cli,
        f"queen {how} (pid {info.pid})",
        {"event": "queen", "state": "stopped", "pid": info.pid, "killed": killed},
    )


@queen.command("status")
@pass_cli
def queen_status(cli: Cli) -> None:
    """Whether the queen on this machine runs and answers."""
    info = daemon.read_info("queen")
    if info is None:
        _fail(
            cli,
            ErrorCode.UNAVAILABLE,
            f"no queen is running on this machine (state directory {daemon.state_dir()})",
            EXIT_UNAVAILABLE,
        )
    cli.queen = cli.queen or local_endpoint_for(info.endpoint)
    cli.run_job(Status())


def _say(cli: Cli, text: str, record: dict[str, Any]) -> None:
    if cli.as_json:
        click.echo(json.dumps({**record, "ts": time.time()}))
    else:
        click.echo(text)


def _fail(cli: Cli, code: ErrorCode, message: str, exit_code: int) -> NoReturn:
    cli.renderer().problem(code, message)
    sys.exit(exit_code)


def run(argv: list[str] | None = None) -> None:
    """Entry point that turns usage errors, Ctrl-C and mesh errors into exit codes."""
    try:
        result = main.main(args=argv, prog_name="rbee-mesh", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(EXIT_CANCELLED)
    except MeshError as exc:
        click.secho(f"error: {exc.message} [{exc.code}]", err=True, fg="red")
        sys.exit(_EXIT_FOR_CODE.get(exc.code, EXIT_FAILED))
    sys.exit(result if isinstance(result, int) else EXIT_OK)
