"""How job events look to a person (narration lines, tables) or to a machine (NDJSON).

Human output: narration goes to stderr as ``[actor     ] action          : message``, coloured by
level on a terminal; tokens and results go to stdout, so `rbee-mesh ... > out.txt` keeps only the
answer. JSON output (`--json`): one object per event per line on stdout, nothing else.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
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
from rbee_mesh.units import human_bytes

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
    return said_line(n.actor, n.action, n.human)


def said_line(actor: str, action: str, human: str) -> str:
    """What an actor says, as a person reads narration (also the keeper's own steps)."""
    return f"[{actor:<10}] {action:<15} : {human}"


class HumanRenderer:
    """Narration to stderr, results to stdout, formatted for the job's operation."""

    def __init__(self) -> None:
        self._op = ""
        self._open_tokens = False
        self._bar = ProgressBar() if sys.stderr.isatty() else None

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
                if message.record.get("kind") == "progress":
                    if self._bar is not None:
                        self._bar.draw(message.record)
                else:
                    click.echo(json.dumps(message.record), err=True)
            case Done() if self._op == "infer":
                # The text has streamed to stdout already; how it went goes to stderr.
                self._end_tokens()
                click.secho(_infer_summary(message.result), err=True, dim=True)
            case Done():
                self._end_tokens()
                text = RESULT_FORMATTERS.get(self._op, format_value)(message.result)
                if text:
                    click.echo(text)
            case Error():
                self._end_tokens()
                self.problem(message.code, message.message)
            case Cancelled():
                self._end_tokens()
                click.secho(f"cancelled: {message.reason}", err=True, fg="yellow")
            case Accepted():
                self._op = message.op

    def problem(self, code: str, message: str) -> None:
        click.secho(f"error: {message} [{code}]", err=True, fg="red", bold=True)

    def note(self, text: str) -> None:
        click.secho(text, err=True, dim=True)

    def _end_tokens(self) -> None:
        if self._open_tokens:
            click.echo()
            self._open_tokens = False
        if self._bar is not None:
            self._bar.clear()


class WatchRenderer:
    """What `jobs watch` shows: the watched job's events as its submitter saw them, rendered by
    `inner`. The watch's own ACCEPTED is not shown; its first frame (a DATA record, "kind":
    "watch") says which job it follows, shown as that job's ACCEPTED; every event after it
    carries that job's id."""

    def __init__(self, inner: Renderer) -> None:
        self.inner = inner
        self.job_id = ""

    def event(self, message: Message) -> None:
        match message:
            case Accepted() if not self.job_id:
                return
            case Data() if not self.job_id and message.record.get("kind") == "watch":
                r = message.record
                self.job_id = str(r["job"])
                accepted = Accepted(
                    job_id=self.job_id, ref=r["ref"], op=r["op"], deadline_s=r["deadline_s"]
                )
                self.inner.event(accepted)
                return
        self.inner.event(replace(message, job_id=self.job_id) if self.job_id else message)

    def problem(self, code: str, message: str) -> None:
        self.inner.problem(code, message)

    def note(self, text: str) -> None:
        self.inner.note(text)


class TopRenderer:
    """What `top` shows a person: each snapshot drawn over the last on a terminal (one after
    the other elsewhere); its end and anything else as `inner` renders them."""

    def __init__(self, inner: Renderer) -> None:
        self.inner = inner
        self.tty = sys.stdout.isatty()

    def event(self, message: Message) -> None:
        match message:
            case Data() if message.record.get("kind") == "snapshot":
                text = top_text(message.record)
                click.echo(f"\x1b[H\x1b[2J{text}" if self.tty else f"{text}\n", nl=False)
            case Done() | Accepted():
                return
            case _:
                self.inner.event(message)

    def problem(self, code: str, message: str) -> None:
        self.inner.problem(code, message)

    def note(self, text: str) -> None:
        self.inner.note(text)


def top_text(snapshot: dict[str, Any]) -> str:
    """A snapshot of the mesh (the queen's dashboard's) as lines of text, with nothing in it
    that a terminal would take for a command (names and texts come from the mesh)."""
    q = snapshot.get("queen", {})
    lines = [
        f"queen {q.get('name')} · up {q.get('uptime_s')}s · {q.get('hives')} hive(s) · "
        f"{q.get('jobs_running')} job(s) running · {q.get('queued')} queued",
        "",
        f"{'HIVE':<20} {'LIVENESS':<10} {'HEARD':>7}  {'MEMORY USED':<22} {'BUSY':>5}  WORKERS",
    ]
    for h in snapshot.get("hives", []):
        devices = h.get("devices") or []
        total = sum(_count(d.get("memory_total")) for d in devices)
        used = total - sum(_count(d.get("memory_free")) for d in devices)
        memory = f"{human_bytes(used)} of {human_bytes(total)}" if total else "-"
        loads = [d["utilization"] for d in devices if isinstance(d.get("utilization"), float)]
        busy = f"{max(loads):.0%}" if loads else "-"
        age = h.get("heartbeat_age_s")
        heard = f"{age:.1f}s" if isinstance(age, int | float) else "-"
        workers = h.get("workers", [])
        lines.append(f"{h.get('hive', '?'):<20} {h.get('liveness', '?'):<10} {heard:>7}  "
                     f"{memory:<22} {busy:>5}  {h.get('workers_total', len(workers))}")  # fmt: skip
        for w in workers:
            lines.append(f"  {w.get('id')}  {w.get('model')}  {w.get('state')}  "
                         f"{w.get('busy', 0)}/{w.get('slots', 0)} slots busy")  # fmt: skip
    jobs = snapshot.get("jobs", [])
    lines += ["", f"RUNNING JOBS ({len(jobs)})"]
    for j in jobs:
        lines.append(f"  {j.get('id')}  {j.get('op')}  {j.get('model') or ''}  {j.get('age_s')}s")
        lines += [f"    {said}" for said in j.get("narration", [])[-2:]]
        text = str(j.get("text") or "")
        if text:
            lines.append(f"    > {text[-100:]}")
    failures = snapshot.get("failures", [])
    if failures:
        lines += ["", "RECENT FAILURES"]
        lines += [f"  {f.get('id')}  {f.get('op')}: {f.get('error')}" for f in failures]
    return "\n".join("".join(c if c.isprintable() else " " for c in line) for line in lines)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class ProgressBar:
    """One line on a terminal's stderr, redrawn in place: bar, percent, bytes, rate, ETA."""

    WIDTH = 30

    def __init__(self) -> None:
        self._drawn = False

    def draw(self, p: dict[str, Any]) -> None:
        done, total = int(p.get("bytes", 0)), int(p.get("total") or 0)
        fraction = done / total if total else 0.0
        filled = int(self.WIDTH * fraction)
        eta = p.get("eta_s")
        line = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:6.1%} "
            f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(p.get('rate_bps', 0))}/s"
            + (f" ETA {eta:.0f}s" if isinstance(eta, int | float) else "")
        )
        click.echo(f"\r{line}\x1b[K", nl=False, err=True, color=True)
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            click.echo("\r\x1b[K", nl=False, err=True, color=True)
            self._drawn = False


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


def _format_status(result: dict[str, Any]) -> str:
    q = result["queen"]
    lines = [
        f"queen   {q['name']} {q['endpoint']} (pid {q['pid']}, v{q['version']}, "
        f"protocol {q['protocol']}, up {q['uptime_s']:.0f}s)",
        f"jobs    {q['jobs_running']} running; {q['keepers']} keeper(s) connected",
        f"keys    fingerprint {q['fingerprint']}; {q['refused_handshakes']} handshake(s) "
        f"refused; {q['pending_hives']} hive(s) pending",
    ]
    if q.get("api"):
        lines.append(f"api     {q['api']} (OpenAI-compatible)")
    if not result["hives"]:
        return "\n".join([*lines, "hives   none connected"])
    return "\n".join([*lines, "", _format_hives(result["hives"])])


def _format_hives(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no hives"
    cols = ["hive", "source", "liveness", "heartbeat_age_s", "devices", "workers", "models",
            "fingerprint"]  # fmt: skip
    return format_table([{**r, "devices": ",".join(r["devices"])} for r in rows], cols)


def _format_hive_status(r: dict[str, Any]) -> str:
    parts = [
        f"hive {r['hive']} (up {r['uptime_s']:.0f}s, {r['jobs_running']} job(s) running)",
        f"key fingerprint {r['fingerprint']}; {r['refused_handshakes']} handshake(s) refused",
    ]
    if r.get("devices_note"):
        parts.append(str(r["devices_note"]))
    devices = [_sized(d, "memory_total", "memory_free") for d in r["devices"]]
    for title, rows, cols in (
        ("devices", devices, ["id", "name", "memory_total", "memory_free"]),
        ("workers", r["workers"], _WORKER_COLUMNS),
        ("models", [_sized(m, "size") for m in r["models"]], ["id", "status", "size"]),
        ("recent jobs", r.get("jobs", [])[-10:], _JOB_COLUMNS),
    ):
        parts.append(f"\n{title}:\n" + (format_table(rows, cols) if rows else "(none)"))
    return "\n".join(parts)


_WORKER_COLUMNS = ["id", "model", "device", "pid", "state"]


def _format_workers(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no workers"
    return format_table(rows, (["hive"] if "hive" in rows[0] else []) + _WORKER_COLUMNS)


def _format_models(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no models"
    cols = ["id", "status", "size", "arch", "quant", "ctx", "params", "chat", "error"]
    rows = [{**_sized(r, "size"), **_facts(r.get("gguf"))} for r in rows]
    return format_table(rows, (["hive"] if "hive" in rows[0] else []) + cols)


def _facts(gguf: Any) -> dict[str, Any]:
    """A model's GGUF facts as `model list` shows them (nothing for an entry without them)."""
    if not isinstance(gguf, dict):
        return {}
    params = gguf.get("parameters")
    return {
        "arch": gguf.get("architecture"),
        "quant": gguf.get("quantization"),
        "ctx": gguf.get("context_length"),
        "params": f"{params / 1e6:.0f}M" if isinstance(params, int) and params >= 1e6 else params,
        "chat": "template" if gguf.get("chat_template") else "",
    }


def _sized(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The row with byte counts made readable."""
    return {**row, **{k: human_bytes(row[k]) for k in keys if isinstance(row.get(k), int)}}


_JOB_COLUMNS = ["id", "op", "state", "keeper", "duration_s", "error"]


def _format_nodes(rows: list[dict[str, Any]]) -> str:
    when = [
        {**r, "added": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["added"]))} for r in rows
    ]
    return format_table(when, ["name", "fingerprint", "added"])


def _format_jobs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs"
    return format_table([{**r, "error": r["error"][:60]} for r in rows], _JOB_COLUMNS)


def _infer_summary(r: dict[str, Any]) -> str:
    u = r.get("usage", {})
    ttft, queued = u.get("ttft_s"), u.get("queue_s")
    if isinstance(ttft, int | float):
        first = f"first token after {ttft * 1e3:.0f} ms"
        if isinstance(queued, int | float) and queued >= 0.001:
            first += f" ({queued * 1e3:.0f} ms waiting for a worker)"
    else:  # a model whose first token is its end of sequence: normal, and said so
        first = "no token before the model's end of sequence"
    return (
        f"{u.get('generated_tokens', '?')} tokens in {u.get('duration_s', 0):.2f}s "
        f"({u.get('tokens_per_s', 0):.1f} tok/s), {first}; "
        f"prompt {u.get('prompt_tokens', '?')} tokens; "
        f"worker {r.get('worker', '?')} ({r.get('backend', '?')}), "
        f"finished: {r.get('finish_reason', '?')}"
        + (" (the model's context is full)" if r.get("cut_by") == "context" else "")
    )


#: How a person sees the result of each operation; anything else gets `format_value`.
RESULT_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "status": _format_status,
    "ping": lambda r: f"{r['count']} pong(s) in {r['elapsed_s'] * 1e3:.1f} ms",
    "job_list": _format_jobs,
    "job_cancel": lambda r: f"cancelled {r['job']}",
    "hive_list": _format_hives,
    "hive_status": _format_hive_status,
    "hive_refresh": _format_hive_status,
    "worker_list": _format_workers,
    "worker_spawn": lambda r: (
        f"worker {r['id']} is {r['state']} on {r['device']} (pid {r['pid']}), model {r['model']}"
    ),
    "worker_delete": lambda r: f"worker {r['id']} {r['state']}",
    "model_list": _format_models,
    "model_download": lambda r: (
        f"{r['id']}: {r['status']}, {human_bytes(r['size'])}"
        + (f", sha256 {r['sha256'][:16]}..." if r.get("sha256") else "")
    ),
    "model_delete": lambda r: f"deleted {r['model']}",
    "model_import": lambda r: (
        f"{r['id']}: {r['status']}, {human_bytes(r['size'])}, sha256 {r['sha256']}"
    ),
    "invite": lambda r: r["token"],
    "hive_pair": lambda r: r["code"],
    "hive_trust": lambda r: f"trusting hive {r['hive']} ({r['fingerprint']}): {r['liveness']}",
    "hive_untrust": lambda r: f"hive {r['name']} ({r['fingerprint']}) is no longer trusted",
    "keeper_list": lambda rows: _format_nodes(rows) if rows else "no keepers",
    "keeper_revoke": lambda r: f"keeper {r['name']} ({r['fingerprint']}) is revoked",
    "apikey_create": lambda r: r["key"],
    "apikey_list": lambda rows: _format_nodes(rows) if rows else "no API keys",
    "apikey_revoke": lambda r: f"the API key of {r['name']} ({r['fingerprint']}) is revoked",
}


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
