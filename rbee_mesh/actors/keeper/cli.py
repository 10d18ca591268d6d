"""`rbee-mesh`: the keeper, the command line a person types into.

This module is the command tree, and imports nothing heavy: `--help` and `--version` answer
without trio, zmq or msgpack. A command's body imports what it runs (session.py: a job, in trio;
the demo, doctor, a daemon), so each command loads what it needs and no more. Exit codes:
exits.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from rbee_mesh import __version__
from rbee_mesh.actors.keeper import daemon
from rbee_mesh.actors.keeper.exits import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_FOR_CODE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from rbee_mesh.protocol import ErrorCode, MeshError, ProtocolError
from rbee_mesh.protocol.constants import (
    API_PORT,
    DEFAULT_API_BIND,
    DEFAULT_QUEEN_BIND,
    HEARTBEAT_PORT,
    HEARTBEAT_S,
    HIVE_PORT,
    LOCAL_QUEEN_BIND,
    MAX_HEARTBEAT_S,
    MIN_HEARTBEAT_S,
)
from rbee_mesh.transport import EndpointError, local_endpoint_for, parse_endpoint, parse_http_bind

if TYPE_CHECKING:
    from rbee_mesh.actors.keeper.render import Renderer
    from rbee_mesh.actors.trust import Trust
    from rbee_mesh.protocol import Operation


def _this_machine() -> str:
    """This machine's hive id (the hive's code is imported only when a command needs it)."""
    from rbee_mesh.actors.hive.hive import default_hive_id

    return default_hive_id()


@dataclass
class Cli:
    """What every command shares: where the queen is and how to show things."""

    queen: str | None
    as_json: bool

    @functools.cached_property
    def trust(self) -> Trust:
        """This node (the state directory's): its keys, and whom it trusts."""
        from rbee_mesh.actors.trust import Trust

        return Trust.load(daemon.state_dir())

    @property
    def joined(self) -> str | None:
        """The endpoint of the queen this keeper joined (`keeper join`), if any."""
        from rbee_mesh.actors.trust import Role

        queens = [t for t in self.trust.entries(Role.JOINED) if t.endpoint]
        return queens[-1].endpoint if queens else None

    @property
    def queen_known(self) -> bool:
        """Whether there is a queen to talk to: named, running here, or joined."""
        return bool(self.queen or daemon.read_info("queen") or self.joined)

    @property
    def endpoint(self) -> str:
        """--queen / RBEE_MESH_QUEEN, else the local queen daemon's endpoint, else the queen
        this keeper joined, else the default."""
        if self.queen:
            return self.queen
        info = daemon.read_info("queen")
        if info is None and self.joined:
            return self.joined
        return local_endpoint_for(info.endpoint if info else DEFAULT_QUEEN_BIND)

    def renderer(self) -> Renderer:
        from rbee_mesh.actors.keeper.render import HumanRenderer, JsonRenderer

        return JsonRenderer() if self.as_json else HumanRenderer()

    def run_job(
        self, op: Operation, timeout_s: float | None = None, detach: bool = False
    ) -> NoReturn:
        """Submit `op` to the queen, render its events live, exit with its outcome; with
        `detach`, print its id and exit once it is accepted (it runs on)."""
        import trio

        from rbee_mesh.actors.keeper.render import TopRenderer, WatchRenderer
        from rbee_mesh.actors.keeper.session import run_job

        renderer = self.renderer()
        if op.NAME == "job_watch":
            renderer = WatchRenderer(renderer)
        elif op.NAME == "top" and not self.as_json:
            renderer = TopRenderer(renderer)
        code = trio.run(run_job, self.endpoint, op, renderer, timeout_s, self.trust, detach)
        sys.exit(code)


# ---- the command tree ----------------------------------------------------------------------------


class _Main(click.Group):
    """The top command. The commands generated from the operation table are added when a command
    is first looked up or listed (click's way of loading commands lazily): `--version` needs no
    operation table, whose dataclasses take 15 ms to make."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        _add_operation_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _add_operation_commands()
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--queen",
    envvar="RBEE_MESH_QUEEN",
    metavar="ENDPOINT",
    help="Queen to talk to, e.g. tcp://10.0.0.5:7833 (env RBEE_MESH_QUEEN). "
    "Default: the queen started on this machine, else the queen this keeper joined, else "
    + LOCAL_QUEEN_BIND
    + ".",
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
    import logging  # here: --help and --version need none

    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Cli(queen=queen, as_json=as_json)


pass_cli = click.make_pass_decorator(Cli)


@main.command()
@pass_cli
def demo(cli: Cli) -> None:
    """Run a whole mesh in this process and a few jobs through it, narrated live.

    With a real small instruct model (SmolLM2-135M-Instruct: fetched once, about 100 MB, or one
    of your catalog, copied), or offline a tiny model with random weights, it runs: status,
    hives, models, two inference jobs (the first spawns a worker, the second reuses it), a
    cancelled job, a job past its deadline, and the job list, with a timing summary. Needs
    nothing running; its state is kept in ~/.cache/rbee-mesh/demo, and yours is not touched.
    """
    import trio

    from rbee_mesh.actors.keeper.demo import run_demo  # the actors: only for the demo

    ok = trio.run(run_demo, cli.renderer(), daemon.state_dir())
    sys.exit(EXIT_OK if ok else EXIT_FAILED)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_cli
def bench(cli: Cli, args: tuple[str, ...]) -> None:
    """Measure the transport modes side by side, next to an HTTP + SSE baseline.

    Runs `python -m benchmarks.bench ARGS` from this source checkout (benchmarks/ is not
    installed with the package; `rbee-mesh bench --help` shows its options). Needs the bench
    extra (bin/setup bench); docs/benchmarks.md explains the method and holds the latest results.
    """
    checkout = Path(__file__).resolve().parents[3]
    if not (checkout / "benchmarks" / "bench.py").is_file():
        _fail(
            cli,
            ErrorCode.INVALID_REQUEST,
            "rbee-mesh bench runs from a source checkout: benchmarks/ is not installed",
            EXIT_USAGE,
        )
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), path]))}
    argv = [sys.executable, "-m", "benchmarks.bench", *args, *(["--json"] if cli.as_json else [])]
    os.execve(sys.executable, argv, env)


@main.command()
@click.option(
    "--discovery/--no-discovery",
    default=True,
    envvar="RBEE_MESH_DISCOVERY",
    show_default=True,
    help="Listen for hives announced on the LAN for a few seconds.",
)
@pass_cli
def doctor(cli: Cli, discovery: bool) -> None:
    """Explain why a hive is not visible: each check says ok, or the problem and what to do.

    Checks the queen, multicast on this machine, what mDNS announces against what the queen has
    linked, and for each hive: liveness, its port from here, its protocol, its clock.
    """
    import trio

    from rbee_mesh.actors.keeper.doctor import run_doctor

    doctor = functools.partial(run_doctor, cli.endpoint, discovery=discovery, trust=cli.trust)
    checks = trio.run(doctor)
    for check in checks:
        if cli.as_json:
            click.echo(json.dumps(check.to_record()))
            continue
        mark = click.style("ok     ", fg="green") if check.ok else click.style("PROBLEM", fg="red")
        click.echo(f"{mark}  {check.name:<14} {check.message}")
        if check.advice:
            click.echo(f"         {'':<14} -> {check.advice}")
    sys.exit(EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED)


@main.group()
def jobs() -> None:
    """Jobs known to the queen."""


#: `--heartbeat`, for the queen and a hive alike.
_heartbeat_option = click.option(
    "--heartbeat",
    "heartbeat_s",
    default=HEARTBEAT_S,
    show_default=True,
    type=click.FloatRange(MIN_HEARTBEAT_S, MAX_HEARTBEAT_S),
    help="Seconds between heartbeats. A link silent for 3.5 intervals is lost: shorter finds "
    "failures sooner.",
)


#: `--ssh-config`, for every command that reaches another machine over SSH.
_ssh_config_option = click.option(
    "--ssh-config",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The ssh config file to read. Default: ssh's own (~/.ssh/config).",
)

#: `--local-only`, for the queen and a hive alike.
_local_only_option = click.option(
    "--local-only",
    is_flag=True,
    help="Serve this machine only (bind 127.0.0.1), and do not announce on the LAN.",
)


@main.command("id")
@pass_cli
def node_id(cli: Cli) -> None:
    """This node's public key and its fingerprint, for a person to compare.

    One per state directory (the queen, the hive and this command started by one user share
    it), made on first use; the secret half stays in <state>/node.key (mode 0600) and never
    leaves this machine. Another node pins the public key: `queen start --peer HOST#KEY`.
    """
    keys = cli.trust.keypair
    where = str(daemon.state_dir())
    record = {"public_key": keys.public, "fingerprint": keys.fingerprint, "state_dir": where}
    _say(
        cli,
        f"public key   {keys.public}\nfingerprint  {keys.fingerprint}\nstate        {where}",
        record,
    )


@main.command("chat")
@click.argument("model", metavar="MODEL")
@click.option("--system", metavar="TEXT", help="A system message for the whole chat.")
@click.option("-n", "--max-tokens", default=512, show_default=True, help="Tokens per answer.")
@click.option("-t", "--temperature", default=0.7, show_default=True, help="0 is greedy.")
@click.option("--seed", type=int, help="Same seed and words give the same answers.")
@pass_cli
def chat(
    cli: Cli,
    model: str,
    system: str | None,
    max_tokens: int,
    temperature: float,
    seed: int | None,
) -> None:
    """Chat with MODEL in the terminal: each line you type is a turn, answered as it is
    generated, in the model's own chat template, the conversation kept for the session.

    Ctrl-C stops an answer (not the chat); /bye or Ctrl-D ends it. With stdin not a terminal,
    all of it is one message, answered once. With no queen running, a mesh runs inside the
    command for the chat, over this machine's hive.
    """
    import trio

    from rbee_mesh.actors.keeper.commands import make_operation
    from rbee_mesh.actors.keeper.session import run_chat
    from rbee_mesh.protocol import operations as ops

    turn = make_operation(
        ops.Infer, prompt=".", model=model, chat=True, system=system, max_tokens=max_tokens,
        temperature=temperature, seed=seed,
    )  # fmt: skip
    assert isinstance(turn, ops.Infer)
    sys.exit(trio.run(run_chat, cli, turn))


@main.group()
def keeper() -> None:
    """This command line as a keeper of another machine's queen: join it, list and revoke."""


@keeper.command("join")
@click.argument("token")
@pass_cli
def keeper_join(cli: Cli, token: str) -> None:
    """Join the queen that printed TOKEN (`rbee-mesh queen invite --for keeper`; - reads it
    from stdin): from then on this command talks to that queen (unless --queen says otherwise,
    or a queen runs here)."""
    _join(cli, token, f"keeper-{_this_machine()}")


def _join(cli: Cli, text: str, name: str, control_port: int | None = None) -> None:
    """Redeem a join token as this node, named `name` (a hive: with its control port). A token
    of "-" is read from stdin (a command line can be read by other users of the machine)."""
    import trio

    from rbee_mesh.actors.keeper.client import join_queen
    from rbee_mesh.actors.trust import JoinToken

    try:
        token = JoinToken.decode(sys.stdin.readline() if text == "-" else text)
        result = trio.run(join_queen, token, cli.trust, name, control_port)
    except MeshError as exc:
        _fail(cli, exc.code, exc.message, EXIT_FOR_CODE.get(exc.code, EXIT_FAILED))
    fingerprint = result["queen_fingerprint"]
    _say(
        cli,
        f"joined queen {result['queen']} (fingerprint {fingerprint}) as {token.role} "
        f"{result['name']}",
        {"event": "joined", **result},
    )


@main.group()
def queen() -> None:
    """Start, stop and inspect the queen on this machine."""


@queen.command("start")
@click.option(
    "--bind",
    metavar="ENDPOINT",
    help=f"Where keepers reach the queen. Default: {DEFAULT_QUEEN_BIND}, the LAN (only keys "
    f"it trusts get in); with --local-only {LOCAL_QUEEN_BIND}.",
)
@_local_only_option
@click.option(
    "--peer",
    "--hive",
    "hives",
    multiple=True,
    metavar="HOST[:PORT][#KEY]",
    help="A hive to manage without discovery: HOST, HOST:PORT (port 7835 by default) or "
    "tcp://HOST:PORT, then #KEY, the hive's public key (`rbee-mesh id` there; not needed for "
    "a hive of this machine and state directory). Repeatable; also read from [queen] peers in "
    "<state>/config.toml.",
)
@click.option(
    "--integrated",
    "--local-hive",
    "integrated",
    is_flag=True,
    help="The integrated mode: also run this machine's hive inside the queen's process "
    "(--local-hive is its old name).",
)
@click.option(
    "--discovery/--no-discovery",
    default=True,
    envvar="RBEE_MESH_DISCOVERY",
    show_default=True,
    help="Find hives announced on the LAN (mDNS); env RBEE_MESH_DISCOVERY=0 turns it off.",
)
@click.option(
    "--api",
    metavar="HOST:PORT",
    default=DEFAULT_API_BIND,
    show_default=True,
    envvar="RBEE_MESH_API",
    help="Where the OpenAI-compatible HTTP API listens (env RBEE_MESH_API; port 0 picks a "
    f"free one). Beyond loopback (such as 0.0.0.0:{API_PORT}) it requires API keys "
    "(`rbee-mesh apikey create`).",
)
@click.option("--no-api", is_flag=True, help="Serve no HTTP API.")
@_heartbeat_option
@click.option("--foreground", is_flag=True, help="Stay attached and log to stderr.")
@pass_cli
def queen_start(
    cli: Cli,
    bind: str | None,
    local_only: bool,
    hives: tuple[str, ...],
    integrated: bool,
    discovery: bool,
    api: str,
    no_api: bool,
    heartbeat_s: float,
    foreground: bool,
) -> None:
    """Start the queen (a daemon, unless --foreground) and return once it answers.

    It manages the hives it finds on the LAN and trusts (`hive list` shows the others as
    pending: `hive trust`), those that joined it (`queen invite`), those named with --peer or in
    the config file, and (with --integrated) this machine's own, in its process.
    """
    bind = bind or (LOCAL_QUEEN_BIND if local_only else DEFAULT_QUEEN_BIND)
    try:
        parse_http_bind(api)
    except EndpointError as exc:
        raise click.BadParameter(str(exc), param_hint="--api") from None
    if foreground:
        from rbee_mesh.actors.keeper import serving

        serve = serving.serve_queen_forever
        api_bind = None if no_api else api
        _serve_foreground(
            cli, bind, serve, bind, True, hives, integrated, discovery, heartbeat_s, api_bind
        )
        return
    from rbee_mesh.actors.queen.config import load_config, peer_spec

    for hive in hives:  # refused here, not in the daemon's log
        peer_spec(hive)
    load_config(daemon.state_dir())
    argv = ["queen", "start", "--foreground", "--bind", bind]
    argv += [arg for hive in hives for arg in ("--peer", hive)]
    argv += ["--integrated"] if integrated else []
    argv += ["--discovery" if discovery else "--no-discovery"]  # explicit: not from its env
    argv += ["--heartbeat", str(heartbeat_s)]
    argv += ["--no-api"] if no_api else ["--api", api]
    _start_daemon(cli, "queen", argv)


@queen.command("status")
@pass_cli
def queen_status(cli: Cli) -> None:
    """Whether the queen on this machine runs, and what it sees."""
    from rbee_mesh.protocol.operations import Status

    info = _local_daemon(cli, "queen")
    cli.queen = cli.queen or local_endpoint_for(info.endpoint)
    cli.run_job(Status())


@main.group()
def hive() -> None:
    """Hives: start, stop and inspect this machine's; list and inspect the mesh's."""


@hive.command("start")
@click.option(
    "--bind",
    metavar="ENDPOINT",
    help=f"Control endpoint the queen connects to. Default: tcp://0.0.0.0:{HIVE_PORT}, the LAN "
    f"(only queens it trusts get in); with --local-only tcp://127.0.0.1:{HIVE_PORT}.",
)
@click.option(
    "--heartbeat-bind",
    metavar="ENDPOINT",
    help=f"Where the hive publishes its heartbeats (port {HEARTBEAT_PORT}, on the same "
    "interfaces as --bind by default).",
)
@_local_only_option
@click.option(
    "--join",
    "token",
    metavar="TOKEN",
    help="Join the queen that printed TOKEN (`rbee-mesh queen invite`): this hive trusts "
    "that queen, and the queen manages this hive. Good once. - reads it from stdin.",
)
@click.option(
    "--id",
    "hive_id",
    default=lambda: _this_machine(),
    show_default="this machine's name",
    help="The hive's name in the mesh.",
)
@_heartbeat_option
@click.option("--foreground", is_flag=True, help="Stay attached and log to stderr.")
@click.option(
    "--service",
    type=click.Choice(["daemon", "systemd", "auto"]),
    help="How it runs (default: daemon; with --ssh, auto). daemon: detached, until stopped or "
    "the machine restarts; systemd: a systemd user unit, rbee-mesh-hive.service, started again "
    "if it fails and at boot; auto: the unit where a user manager runs that outlives your "
    "sessions, else the daemon.",
)
@click.option(
    "--ssh",
    "ssh_host",
    metavar="HOST",
    help="Start the hive of HOST instead (installed there by `hive install HOST`), over SSH, "
    "joined to this machine's queen.",
)
@_ssh_config_option
@pass_cli
def hive_start(
    cli: Cli,
    bind: str | None,
    heartbeat_bind: str | None,
    local_only: bool,
    token: str | None,
    hive_id: str,
    heartbeat_s: float,
    foreground: bool,
    service: str | None,
    ssh_host: str | None,
    ssh_config: Path | None,
) -> None:
    """Start this machine's hive (a daemon, unless --foreground); return once it answers.

    It serves the LAN and announces itself there (mDNS): a queen lists it as pending until a
    person trusts it (`hive trust` there). With --join TOKEN it joins that queen at once. It
    obeys the queens it trusts only: one of this machine's state directory, or one it joined.

    With --ssh HOST it starts the hive of HOST (a daemon there, which outlives the SSH
    session: a systemd user unit where one would do, as --service auto says) and joins it to
    this machine's queen, which manages it at once: the join token goes over the SSH
    connection, so no pairing step is needed. --bind, --heartbeat-bind, --id, --heartbeat and
    --service apply to that hive; its name is HOST's own unless --id says otherwise.
    """
    if ssh_host is not None:
        if foreground or local_only or token is not None:
            raise click.UsageError(
                "--ssh starts a daemon joined to this queen: it takes no --foreground, "
                "--local-only or --join"
            )
        source = click.get_current_context().get_parameter_source
        given = {
            "--bind": bind,
            "--heartbeat-bind": heartbeat_bind,
            "--id": hive_id if source("hive_id") is ParameterSource.COMMANDLINE else None,
            "--heartbeat": str(heartbeat_s)
            if source("heartbeat_s") is ParameterSource.COMMANDLINE
            else None,
            "--service": service or "auto",
        }
        args = [part for option, value in given.items() if value for part in (option, value)]
        _start_over_ssh(cli, ssh_host, ssh_config, args)
        return
    host = "127.0.0.1" if local_only else "0.0.0.0"
    bind = bind or f"tcp://{host}:{HIVE_PORT}"
    heartbeat_bind = heartbeat_bind or f"tcp://{host}:{HEARTBEAT_PORT}"
    hive_id = _valid_id(hive_id)
    if token is not None and local_only:
        raise click.UsageError("--join needs the LAN: a queen cannot reach a --local-only hive")
    if foreground and service is not None:
        raise click.UsageError("--foreground runs the hive here and now: it takes no --service")
    if token is not None:
        if daemon.read_info("hive") is None:  # (a hive that runs holds its ports itself)
            for endpoint in (bind, heartbeat_bind):
                _port_free_or_fail(cli, endpoint)  # before the queen is told of this hive
        _join(cli, token, hive_id, control_port=parse_endpoint(bind).port)
    if foreground:
        from rbee_mesh.actors.hive.hive import HiveConfig
        from rbee_mesh.actors.jobserver import ServerConfig
        from rbee_mesh.actors.keeper import serving

        config = HiveConfig(
            state_dir=daemon.state_dir(),
            hive_id=hive_id,
            control=bind,
            heartbeats=heartbeat_bind,
            server=ServerConfig(heartbeat_s=heartbeat_s),
            trust=cli.trust,
        )
        _serve_foreground(cli, bind, serving.serve_hive_forever, config, True)
        return
    argv = [
        "hive",
        "start",
        "--foreground",
        "--bind",
        bind,
        "--heartbeat-bind",
        heartbeat_bind,
        "--id",
        hive_id,
        "--heartbeat",
        str(heartbeat_s),
    ]
    _start_daemon(cli, "hive", argv, service or "daemon")


@hive.command("install")
@click.argument("host", metavar="HOST")
@click.option(
    "--offline",
    is_flag=True,
    help="Copy the wheels of every dependency from here: HOST needs no package index (it must "
    "then have this machine's platform and Python minor version).",
)
@_ssh_config_option
@pass_cli
def hive_install(cli: Cli, host: str, offline: bool, ssh_config: Path | None) -> None:
    """Install this rbee-mesh on HOST over SSH; again, to upgrade it in place.

    It goes into a virtual environment in the remote user's data directory
    (~/.local/share/rbee-mesh; no root needed), built from this rbee-mesh's own source, its
    dependencies from HOST's package index (or, with --offline, from here). HOST is whatever
    ssh takes (an alias from your ssh config, user@host) or host:port; keys come from your
    agent or your ssh config, and HOST's key must be in known_hosts already.
    """
    from rbee_mesh.actors.keeper.remote_hive import install

    done = _over_ssh(cli, host, ssh_config, lambda h, say: install(h, offline=offline, say=say))
    _say(
        cli,
        f"{done.version} installed on {done.host} in {done.path} (Python {done.python})",
        {"event": "installed", "host": done.host, "path": done.path, "python": done.python,
         "version": done.version},
    )  # fmt: skip


@hive.command("uninstall")
@click.argument("host", metavar="HOST")
@_ssh_config_option
@pass_cli
def hive_uninstall(cli: Cli, host: str, ssh_config: Path | None) -> None:
    """Remove rbee-mesh from HOST (what `hive install HOST` put there), its hive stopped first
    if it runs. The hive's state there, its models among it, stays."""
    from rbee_mesh.actors.keeper.remote_hive import uninstall

    removed = _over_ssh(cli, host, ssh_config, lambda h, say: uninstall(h, say=say))
    text = f"rbee-mesh removed from {host}" if removed else f"rbee-mesh was not installed on {host}"
    _say(cli, text, {"event": "uninstalled", "host": host, "removed": removed})


def _start_over_ssh(cli: Cli, host: str, ssh_config: Path | None, hive_args: list[str]) -> None:
    from rbee_mesh.actors.keeper.client import open_keeper
    from rbee_mesh.actors.keeper.remote_hive import start
    from rbee_mesh.actors.keeper.systemd import unit_name
    from rbee_mesh.protocol import outcome
    from rbee_mesh.protocol.operations import Invite

    endpoint = local_endpoint_for(_local_daemon(cli, "queen").endpoint)

    async def invite(address: str) -> str:
        async with open_keeper(endpoint, trust=cli.trust) as keeper:
            job = await keeper.submit(Invite(role="hive", address=address))
            token: str = outcome(await job.end(), "the queen")["token"]
            return token

    done = _over_ssh(
        cli, host, ssh_config, lambda h, say: start(h, hive_args, invite=invite, say=say)
    )
    how = f"systemd user unit {unit_name('hive')}" if done.service == "systemd" else "daemon"
    _say(
        cli,
        f"hive {done.hive} started on {done.host} (pid {done.pid}, {how}) on {done.endpoint}, "
        f"joined to this queen at {done.queen_address}"
        + (f"\n(not a systemd user unit: {done.not_systemd_because})"
           if done.not_systemd_because else ""),
        {"event": "hive", "state": "running", "host": done.host, "hive": done.hive,
         "endpoint": done.endpoint, "pid": done.pid, "queen_address": done.queen_address,
         "service": done.service, "not_systemd_because": done.not_systemd_because},
    )  # fmt: skip


def _status_over_ssh(cli: Cli, host: str, ssh_config: Path | None) -> NoReturn:
    from rbee_mesh.actors.keeper.exits import EXIT_NOT_FOUND
    from rbee_mesh.actors.keeper.remote_hive import status

    found = _over_ssh(cli, host, ssh_config, lambda h, say: status(h, say=say))
    if found["version"] is None:
        text = f"rbee-mesh is not installed on {host}"
    elif found["running"]:
        hive = found["hive"] or {}
        text = f"{found['version']} on {host}: hive {hive.get('hive', '?')} runs"
    else:
        text = f"{found['version']} on {host}: no hive runs"
    _say(cli, text, {"event": "status", **found})
    if found["version"] is None:
        sys.exit(EXIT_NOT_FOUND)
    sys.exit(EXIT_OK if found["running"] else EXIT_UNAVAILABLE)


def _over_ssh(
    cli: Cli,
    host: str,
    ssh_config: Path | None,
    work: Callable[[Any, Callable[[str, str], None]], Any],
) -> Any:
    """Run `work(host, say)` (a coroutine function), its steps shown as they start; a failure
    ends the command with its exit code (exits.py)."""
    import trio

    from rbee_mesh.actors.keeper.exits import EXIT_FOR_REMOTE
    from rbee_mesh.actors.keeper.remote import Host, SshError
    from rbee_mesh.actors.keeper.remote_hive import RemoteHiveError
    from rbee_mesh.actors.keeper.render import said_line

    try:
        target = Host.parse(host, config=ssh_config)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="HOST") from None

    def say(step: str, text: str) -> None:
        if cli.as_json:
            click.echo(json.dumps({"event": "step", "step": step, "message": text,
                                   "ts": time.time()}))  # fmt: skip
        else:
            click.secho(said_line("keeper", step, text), err=True)

    try:
        return trio.run(work, target, say)
    except (SshError, RemoteHiveError) as exc:
        cli.renderer().problem(str(exc.failure), exc.message)
        sys.exit(EXIT_FOR_REMOTE.get(exc.failure, EXIT_FAILED))


@hive.command("status")
@click.argument("hive_id", metavar="[HIVE]", required=False)
@click.option(
    "--ssh",
    "ssh_host",
    metavar="HOST",
    help="Ask HOST over SSH instead: whether rbee-mesh is installed there, which, and whether "
    "its hive runs (exit 0 runs, 3 does not, 4 not installed).",
)
@_ssh_config_option
@pass_cli
def hive_status(
    cli: Cli, hive_id: str | None, ssh_host: str | None, ssh_config: Path | None
) -> None:
    """A hive asked itself (not the queen's view from its heartbeats): devices, workers,
    models and its own recent jobs. HIVE through the queen; without it, this machine's hive
    daemon, directly."""
    from rbee_mesh.actors.keeper.commands import make_operation
    from rbee_mesh.protocol.operations import HiveStatus

    if ssh_host is not None:
        _status_over_ssh(cli, ssh_host, ssh_config)
    if hive_id is not None:
        cli.run_job(make_operation(HiveStatus, hive=hive_id))
    info = _local_daemon(cli, "hive")
    cli.queen = local_endpoint_for(info.endpoint)
    cli.run_job(HiveStatus(hive=info.ident))


@hive.command("pair")
@click.option(
    "--ttl",
    "ttl_s",
    default=600.0,
    show_default=True,
    type=click.FloatRange(10, 86400),
    help="Seconds the code is good for.",
)
@pass_cli
def hive_pair(cli: Cli, ttl_s: float) -> None:
    """Print a pairing code for this machine's hive: on the queen's machine, `rbee-mesh hive
    trust HIVE --code CODE` then makes the queen and this hive trust each other (the hive shows
    there as pending, found on the LAN). The code is good once, for --ttl seconds."""
    from rbee_mesh.protocol.operations import HivePair

    info = _local_daemon(cli, "hive")
    cli.queen = local_endpoint_for(info.endpoint)
    cli.run_job(HivePair(ttl_s=ttl_s))


@queen.command("stop")
@pass_cli
def queen_stop(cli: Cli) -> None:
    """Stop the queen on this machine: its jobs end with UNAVAILABLE, then it exits."""
    _stop_daemon(cli, "queen")


@hive.command("stop")
@click.option("--ssh", "ssh_host", metavar="HOST", help="Stop the hive of HOST instead, over SSH.")
@_ssh_config_option
@pass_cli
def hive_stop(cli: Cli, ssh_host: str | None, ssh_config: Path | None) -> None:
    """Stop this machine's hive: its jobs end, its workers stop, then it exits."""
    if ssh_host is None:
        _stop_daemon(cli, "hive")
        return
    from rbee_mesh.actors.keeper.remote_hive import stop

    was_running = _over_ssh(cli, ssh_host, ssh_config, lambda h, say: stop(h, say=say))
    text = f"the hive on {ssh_host} stopped" if was_running else f"no hive ran on {ssh_host}"
    _say(cli, text, {"event": "hive", "state": "stopped", "host": ssh_host,
                     "was_running": was_running})  # fmt: skip


@main.group()
def worker() -> None:
    """Worker processes: one per loaded model."""


@main.group()
def model() -> None:
    """Models in the hives' catalogs."""


@main.group()
def apikey() -> None:
    """Keys for the queen's HTTP API (needed when it serves beyond this machine)."""


def _run_operation(
    ctx: click.Context, op: Operation, timeout_s: float | None, detach: bool = False
) -> None:
    ctx.find_object(Cli).run_job(op, timeout_s, detach)  # type: ignore[union-attr]


def _run_here_without_a_queen(
    ctx: click.Context, op: Operation, timeout_s: float | None, detach: bool = False
) -> None:
    """With no queen running (and none named or joined), in a mesh made for this command, over
    this machine's hive: `infer`, and what reads or changes this machine's catalog."""
    import trio

    from rbee_mesh.actors.keeper.session import run_here

    cli = ctx.find_object(Cli)
    assert cli is not None
    if cli.queen_known:
        cli.run_job(op, timeout_s, detach)
    if detach:
        raise click.UsageError(
            "--detach needs a queen that runs on after this command (`rbee-mesh queen start`); "
            "none is running here"
        )
    sys.exit(trio.run(run_here, cli, op, timeout_s))


@functools.cache
def _add_operation_commands() -> None:
    """Add the commands generated from the operation table (commands.py), once."""
    from rbee_mesh.actors.keeper.commands import add_operation_commands
    from rbee_mesh.protocol import operations as ops

    #: What a command can do with no queen running, on this machine's hive alone.
    without_a_queen = (
        ops.Infer,
        ops.Status,
        ops.Ping,
        ops.HiveList,
        ops.HiveGet,
        ops.WorkerList,
        ops.WorkerGet,
        ops.ModelList,
        ops.ModelGet,
        ops.ModelDownload,
        ops.ModelDelete,
        ops.JobList,
        ops.ApiKeyCreate,
        ops.ApiKeyList,
        ops.ApiKeyRevoke,
    )  # fmt: skip (and `model import`, a command of its own)
    add_operation_commands(
        main, _run_operation, dict.fromkeys(without_a_queen, _run_here_without_a_queen)
    )


@model.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--hive", metavar="HIVE", help="This machine's hive, where there are several.")
@click.option("--name", metavar="OWNER/REPO", help="Its id in the catalog (default: local/NAME).")
@click.pass_context
def model_import(ctx: click.Context, path: Path, hive: str | None, name: str | None) -> None:
    """Add the GGUF file PATH to this machine's hive's catalog (a queen running or not).

    The file is checked (one that is not GGUF, or is truncated, is refused and nothing is
    added), copied with its sha256 (progress for a large one), and listed only once whole;
    `model list` shows its architecture, quantization, context length and parameter count.
    """
    from rbee_mesh.actors.keeper.commands import make_operation
    from rbee_mesh.protocol.operations import ModelImport

    op = make_operation(ModelImport, path=str(path.resolve()), name=name, hive=hive)
    _run_here_without_a_queen(ctx, op, None)


# ---- daemons -----------------------------------------------------------------------------------


def _valid_id(hive_id: str) -> str:
    from rbee_mesh.protocol.operations import HiveGet

    try:
        return HiveGet(hive=hive_id).hive
    except ProtocolError as exc:
        raise click.BadParameter(exc.message, param_hint="--id") from None


def _serve_foreground(cli: Cli, bind: str, serve: Callable[..., Any], *args: Any) -> None:
    import logging

    import trio

    logging.getLogger("rbee_mesh").setLevel(min(logging.INFO, logging.root.level))
    try:
        trio.run(serve, *args)
    except EndpointError as exc:  # its message names where
        _fail(cli, ErrorCode.UNAVAILABLE, f"cannot serve: {exc}", EXIT_UNAVAILABLE)
    except OSError as exc:
        _fail(cli, ErrorCode.UNAVAILABLE, f"cannot serve on {bind}: {exc}", EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        pass


def _port_free_or_fail(cli: Cli, endpoint: str) -> None:
    """End the command if the tcp `endpoint` cannot be bound now (as libzmq binds it: with
    SO_REUSEADDR); other schemes pass."""
    import socket

    parsed = parse_endpoint(endpoint)
    if parsed.scheme != "tcp" or parsed.host is None or not parsed.port:
        return
    host = parsed.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, parsed.port))
        except OSError as exc:
            _fail(cli, ErrorCode.UNAVAILABLE, f"cannot serve on {endpoint}: {exc.strerror}",
                  EXIT_UNAVAILABLE)  # fmt: skip


def _start_daemon(cli: Cli, name: str, argv: list[str], service: str = "daemon") -> None:
    """Start `rbee-mesh <argv>` as the daemon `name`: detached, or with `service` "systemd" as
    a systemd user unit ("auto": the unit where one would do, saying why not where not)."""
    running = daemon.read_info(name)
    if running is not None:
        _say(
            cli,
            f"{name} already running (pid {running.pid}) on {running.endpoint}",
            {
                "event": name,
                "state": "running",
                "pid": running.pid,
                "endpoint": running.endpoint,
                "started": False,
            },
        )
        return
    import trio

    from rbee_mesh.actors.keeper import systemd
    from rbee_mesh.actors.keeper.session import wait_until_serving

    why_not = systemd.unusable() if service != "daemon" else None
    if service == "systemd" and why_not is not None:
        _fail(cli, ErrorCode.UNAVAILABLE, f"cannot run the {name} as a systemd user unit: "
              f"{why_not}", EXIT_UNAVAILABLE)  # fmt: skip
    unit = service != "daemon" and why_not is None
    poll: Callable[[], int | None]
    if unit:
        try:
            pid = systemd.install(name, argv)
        except systemd.SystemdError as exc:
            systemd.remove(name)
            _fail(cli, ErrorCode.UNAVAILABLE, str(exc), EXIT_UNAVAILABLE)
        poll = functools.partial(_exited, pid)
    else:
        proc = daemon.spawn_detached(name, argv)
        pid, poll = proc.pid, proc.poll
    info = trio.run(wait_until_serving, name, pid, poll, cli.trust)
    if info is None:
        code = poll()
        if unit:
            systemd.remove(name)
        elif code is None:
            daemon.stop_process(pid, grace_s=2)
        why = f"exited with code {code}" if code is not None else "did not answer within 15s"
        _fail(
            cli,
            ErrorCode.UNAVAILABLE,
            f"the {name} {why}. Its log ({daemon.log_path(name)}) ends with:\n"
            f"{daemon.log_tail(name)}",
            EXIT_UNAVAILABLE,
        )
    how = f"systemd user unit {systemd.unit_name(name)}" if unit else "daemon"
    _say(
        cli,
        f"{name} started (pid {info.pid}, {how}) on {info.endpoint}"
        + (f", OpenAI-compatible API at {info.api}" if info.api else "")
        + f"; log: {daemon.log_path(name)}"
        + (f"\n(not a systemd user unit: {why_not})" if why_not else ""),
        {
            "event": name,
            "state": "running",
            "pid": info.pid,
            "endpoint": info.endpoint,
            "api": info.api or None,
            "started": True,
            "service": "systemd" if unit else "daemon",
            "not_systemd_because": why_not,
        },
    )


def _exited(pid: int) -> int | None:
    """None while `pid` runs, else 1 (a process not our child: its status is not ours to read)."""
    return None if daemon.is_running(pid) else 1


def _stop_daemon(cli: Cli, name: str) -> None:
    """Stop the daemon `name`, and disable and remove its systemd user unit if it has one."""
    from rbee_mesh.actors.keeper import systemd

    info = daemon.read_info(name)
    try:
        unit = systemd.remove(name)  # (systemd stops it: else it would start it again)
    except systemd.SystemdError as exc:
        _fail(cli, ErrorCode.UNAVAILABLE, str(exc), EXIT_UNAVAILABLE)
    removed = f"; systemd user unit {systemd.unit_name(name)} removed" if unit else ""
    if info is None:
        _say(
            cli,
            f"no {name} is running on this machine{removed}",
            {"event": name, "state": "stopped", "pid": None, "unit_removed": unit},
        )
        return
    killed = daemon.stop_process(info.pid)
    daemon.remove_info(name, info.pid)
    how = "killed after it ignored SIGTERM" if killed else "stopped"
    _say(
        cli,
        f"{name} {how} (pid {info.pid}){removed}",
        {"event": name, "state": "stopped", "pid": info.pid, "killed": killed,
         "unit_removed": unit},
    )  # fmt: skip


def _local_daemon(cli: Cli, name: str) -> daemon.DaemonInfo:
    info = daemon.read_info(name)
    if info is None:
        _fail(
            cli,
            ErrorCode.UNAVAILABLE,
            f"no {name} is running on this machine (state directory {daemon.state_dir()})",
            EXIT_UNAVAILABLE,
        )
    return info


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
        sys.exit(EXIT_FOR_CODE.get(exc.code, EXIT_FAILED))
    sys.exit(result if isinstance(result, int) else EXIT_OK)
