"""The keeper's commands that submit one operation and render its result, generated from the
operation table (`protocol/operations.py`): each operation with a `COMMAND` becomes a click
command, its fields the command's arguments and options (`Arg`: help, short name, metavar), its
docstring the command's help. A value out of range is refused by the operation itself, so the
command line and the wire check it in the same place.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import click

from rbee_mesh.protocol import OPERATIONS, Actor, Operation, ProtocolError
from rbee_mesh.protocol.fields import (
    Bool,
    Choice,
    Float,
    Int,
    Optional,
    Parameter,
    Spec,
    TextList,
    parameters,
)

#: How a generated command runs its operation: (the click context, the operation, --timeout,
#: --detach).
Runner = Callable[[click.Context, Operation, float | None, bool], None]


def make_operation(op_cls: type[Operation], **values: Any) -> Operation:
    """Build an operation from command-line values; a bad value is a usage error (exit 2)."""
    try:
        return op_cls(**values)
    except ProtocolError as exc:
        raise click.UsageError(exc.message) from None


def add_operation_commands(
    main: click.Group, run: Runner, runners: Mapping[type[Operation], Runner]
) -> None:
    """Add a command to `main` (or to its group named by the first word) for every operation
    with a COMMAND; `runners` overrides `run` for some."""
    for op_cls in OPERATIONS.values():
        if op_cls.COMMAND is None:
            continue
        *group_words, name = op_cls.COMMAND
        group = main
        for word in group_words:
            found = group.commands.get(word)
            assert isinstance(found, click.Group), f"no command group {word!r} for {name}"
            group = found
        group.add_command(_command(name, op_cls, runners.get(op_cls, run)))


def _command(name: str, op_cls: type[Operation], run: Runner) -> click.Command:
    params = [_click_param(p) for p in parameters(op_cls)]
    params.append(
        click.Option(
            ["--timeout", "timeout_s"],
            type=float,
            metavar="SECONDS",
            help=f"Seconds the job may take (default {op_cls.DEADLINE_S:g}).",
        )
    )
    if op_cls.TARGET in (Actor.HIVE, Actor.WORKER):  # what runs long enough to leave running
        params.append(
            click.Option(
                ["--detach"],
                is_flag=True,
                help="Print the job's id and return; the job runs on (`rbee-mesh jobs watch "
                "JOB_ID` follows it, `jobs cancel` stops it). Needs a running queen.",
            )
        )

    def callback(timeout_s: float | None, detach: bool = False, **values: Any) -> None:
        op = make_operation(op_cls, **values)
        run(click.get_current_context(), op, timeout_s, detach)

    return click.Command(
        name, params=params, callback=callback, help=inspect.cleandoc(op_cls.__doc__ or "")
    )


def _click_param(p: Parameter) -> click.Parameter:
    arg = p.arg
    required = p.default is dataclasses.MISSING
    inner = p.spec.inner if isinstance(p.spec, Optional) else p.spec
    kind = _click_type(inner)
    if arg.argument:
        return click.Argument(
            [p.name], type=kind, required=required, metavar=arg.metavar or p.name.upper()
        )
    long = f"--{arg.name or p.name.replace('_', '-')}"
    names = [long, *([arg.short] if arg.short else []), p.name]
    options: dict[str, Any] = {"help": arg.help or None, "metavar": arg.metavar or None}
    if isinstance(inner, Bool):
        if arg.negated_by:
            names = [f"--{arg.negated_by}", p.name]
            return click.Option(names, is_flag=True, flag_value=False, default=True, **options)
        names = [f"{long}/--no-{long[2:]}", p.name]
        return click.Option(names, default=p.default, show_default=True, **options)
    if isinstance(inner, TextList):
        return click.Option(names, multiple=True, type=kind, **options)
    if required:
        return click.Option(names, type=kind, required=True, **options)
    show = p.default is not None
    return click.Option(names, type=kind, default=p.default, show_default=show, **options)


def _click_type(spec: Spec) -> Any:
    if isinstance(spec, Choice):
        return click.Choice(spec.values)
    if isinstance(spec, Int):
        return int
    if isinstance(spec, Float):
        return float
    return str
