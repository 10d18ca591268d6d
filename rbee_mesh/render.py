"""How job events look to a person (narration lines, tables) or to a machine (NDJSON).

Human output: narration goes to stderr as ``[actor     ] action          : message``, coloured by
level on a terminal; tokens and results go to stdout, so `rbee-mesh ... > out.txt` keeps only the
answer. JSON output (`--json`): one object per event per line on stdout, nothing else.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol

import click

from rbee_mesh.protocol import (
    Accepted,
    Cancelled,
    Data,
    Done,
    Error,
    Level,
    Message,
    Narration,
    Token,
)

_LEVEL_STYLE: dict[Level, dict[str, Any]] = {
    Level.DEBUG: {"dim": True},
    Level.INFO: {},
    Level.WARN: {"fg": "yellow"},
    Level.ERROR: {"fg": "red", "bold": True},
}


class Renderer(Protocol):
    def event(self, message: Message) -> None: ...

    def problem(self, code: str, message: str) -> None:
        """A failure that is not a job frame (for example: the queen is unreachable)."""
        ...

    def note(self, text: str) -> None:
        """A line from the keeper itself, for a person (JSON output skips it)."""
        ...


def narration_line(n: Narration) -> str:
    return f"[{n.actor:<10}] {n.action:<15} : {n.human}"


class HumanRenderer:
    """Narration to stderr, results to stdout. `formatter` turns a DONE result into text."""

    def __init__(self, formatter: Any = None) -> None:
        self.formatter = formatter or format_value
        self._open_tokens = False

    def event(self, message: Message) -> None:
        match message:
            case Narration():
                self._end_tokens()
                click.secho(narration_line(message), err=True, **_LEVEL_STYLE[message.level])
            case Token():
                click.echo(message.text, nl=False)
                self._open_tokens = True
            case Data():
                self._end_tokens()
                click.echo(json.dumps(message.record), err=True)
            case Done():
                self._end_tokens()
                text = self.formatter(message.result)
                if text:
                    click.echo(text)
            case Error():
                self._end_tokens()
                self.problem(message.code, message.message)
            case Cancelled():
                self._end_tokens()
                click.secho(f"cancelled: {message.reason}", err=True, fg="yellow")
            case Accepted():
                pass

    def problem(self, code: str, message: str) -> None:
        click.secho(f"error: {message} [{code}]", err=True, fg="red", bold=True)

    def note(self, text: str) -> None:
        click.secho(text, err=True, dim=True)

    def _end_tokens(self) -> None:
        if self._open_tokens:
            click.echo()
            self._open_tokens = False


class JsonRenderer:
    """One JSON object per event per line on stdout."""

    def event(self, message: Message) -> None:
        record: dict[str, Any] = {"event": message.KIND.name.lower(), "job_id": message.job_id}
        record.update(message.to_wire())
        self._write(record)

    def problem(self, code: str, message: str) -> None:
        self._write({"event": "error", "job_id": "", "code": code, "message": message})

    def note(self, text: str) -> None:
        pass

    def _write(self, record: dict[str, Any]) -> None:
        record.setdefault("ts", time.time())
        sys.stdout.write(json.dumps(record, default=str) + "\n")
        sys.stdout.flush()


def format_value(value: Any) -> str:
    """A readable default for any result: nothing, a table for lists of records, else YAML-ish."""
    if value is None:
        return ""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return format_table(value)
    if isinstance(value, list) and not value:
        return "(none)"
    return _format_tree(value, 0).rstrip("\n")


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def _format_tree(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, dict):
        out = ""
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out += f"{pad}{key}:\n{_format_tree(item, indent + 1)}"
            else:
                out += f"{pad}{key}: {_cell(item) if item != [] else '(none)'}\n"
        return out
    if isinstance(value, list):
        return "".join(f"{pad}- {_format_tree(v, indent + 1).strip()}\n" for v in value)
    return f"{pad}{_cell(value)}\n"
