"""The queen's Prometheus metrics: what `GET /metrics` of its HTTP server answers
(docs/observability.md), in Prometheus' text format, made with the official prometheus-client
(its registry, metric types and exposition: the format's rules are that library's business).

Two kinds. What happens (jobs ending, their durations, the wait in the queue, time to first
token, tokens per second) is counted as it happens, from the queen's job server and scheduler.
What is (hives and their liveness, workers by state, heartbeat ages, models, queue depth,
running jobs, refused handshakes, and what each hive's heartbeat says it downloaded and served
other hives) is read when Prometheus scrapes, from the queen's own registries: nothing is
polled, and a scrape costs what the mesh's size does. They are made when the queen's HTTP server
starts (api.py): a queen without one (`--no-api`, a mesh inside one command) does not import
prometheus-client (16 ms) nor counts anything.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rbee_mesh.actors.queen.dashboard import rows
from rbee_mesh.protocol import Cancelled, Done, Error, ErrorCode, Message

if TYPE_CHECKING:
    from rbee_mesh.actors.jobserver import ServerJob
    from rbee_mesh.actors.queen.queen import Queen

#: The content type of what `render` returns.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds: a control job's milliseconds up to a download's hours.
_DURATIONS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 7200)
_FIRST_TOKEN = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOKEN_RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    """The queen's metrics, in a registry of their own (not prometheus-client's global one: two
    queens of one process, as tests run them, each have theirs)."""

    def __init__(self, queen: Queen) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "rbee_mesh_jobs", "Jobs ended at the queen, by operation and outcome (done, "
            "cancelled, or the error code).", ["operation", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.durations = Histogram(
            "rbee_mesh_job_duration_seconds", "How long jobs ran at the queen, accepted to end.",
            ["operation"], buckets=_DURATIONS, registry=self.registry,
        )  # fmt: skip
        self.queued = Histogram(
            "rbee_mesh_queue_wait_seconds", "How long infer jobs waited to be placed on a worker.",
            buckets=_DURATIONS, registry=self.registry,
        )  # fmt: skip
        self.first_token = Histogram(
            "rbee_mesh_time_to_first_token_seconds", "From an infer job's start to its first "
            "token.", buckets=_FIRST_TOKEN, registry=self.registry,
        )  # fmt: skip
        self.token_rate = Histogram(
            "rbee_mesh_generation_tokens_per_second", "Tokens per second of each infer job, "
            "from its first token to its end.", buckets=_TOKEN_RATES, registry=self.registry,
        )  # fmt: skip
        self.refused = Counter(
            "rbee_mesh_submits_refused", "Submissions refused before they became jobs (busy, not "
            "permitted, malformed, late), by operation and error code.", ["operation", "code"],
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(_State(queen))

    def submit_refused(self, operation: str, code: ErrorCode) -> None:
        self.refused.labels(operation, str(code).lower()).inc()

    def job_ended(self, job: ServerJob, terminal: Message) -> None:
        """Count a job that ended (the job server tells, as its observer)."""
        if isinstance(terminal, Error):
            outcome = str(terminal.code).lower()
        elif isinstance(terminal, Cancelled):
            outcome = "cancelled"
        else:
            outcome = "done"
        operation = job.op.NAME
        self.jobs.labels(operation, outcome).inc()
        if job.ended is not None:
            self.durations.labels(operation).observe(max(0.0, job.ended - job.created))
        if job.first_token is None or job.ended is None:
            return
        self.first_token.observe(max(0.0, job.first_token - job.created))
        tokens = _generated_tokens(terminal)
        if tokens >= 2 and job.ended > job.first_token:  # (the first token starts the clock)
            self.token_rate.observe((tokens - 1) / (job.ended - job.first_token))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _generated_tokens(terminal: Message) -> int:
    result = terminal.result if isinstance(terminal, Done) else None
    usage = result.get("usage") if isinstance(result, dict) else None
    tokens = usage.get("generated_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else 0


class _State(Collector):
    """What the queen knows now, read at each scrape."""

    def __init__(self, queen: Queen) -> None:
        self.queen = queen

    def collect(self) -> Iterator[Metric]:
        queen = self.queen
        yield _gauge("rbee_mesh_jobs_running", "Jobs running at the queen now.",
                     len(queen.server.running_jobs))  # fmt: skip
        yield _gauge("rbee_mesh_queue_depth", "Infer jobs waiting for a worker.", len(queen.queue))
        refused = CounterMetricFamily(
            "rbee_mesh_refused_handshakes", "Connections refused at the handshake: a key this "
            "node does not trust.", value=queen.trust.refusals,
        )  # fmt: skip
        yield refused
        links = queen.hives.links
        by_liveness = Tally(link.liveness_state for link in links)
        hives = GaugeMetricFamily("rbee_mesh_hives", "Hives by liveness.", labels=["liveness"])
        for liveness in ("live", "suspect", "lost", "connecting"):
            hives.add_metric([liveness], by_liveness.get(liveness, 0))
        yield hives
        yield from _per_hive(links)


def _per_hive(links: list[Any]) -> Iterator[Metric]:
    workers = GaugeMetricFamily(
        "rbee_mesh_workers", "Workers by hive and state, as the hive's last heartbeat said.",
        labels=["hive", "state"],
    )  # fmt: skip
    age = GaugeMetricFamily(
        "rbee_mesh_hive_heartbeat_age_seconds", "Since the hive was last heard.", labels=["hive"]
    )
    models = GaugeMetricFamily("rbee_mesh_hive_models", "Models in the hive's catalog.",
                               labels=["hive"])  # fmt: skip
    loaded = GaugeMetricFamily(
        "rbee_mesh_models_loaded", "Distinct models its ready or busy workers hold.",
        labels=["hive"],
    )  # fmt: skip
    downloaded = CounterMetricFamily(
        "rbee_mesh_hive_downloaded_bytes", "Bytes of models the hive downloaded (from the hub "
        "or other hives) since it started; rate() of it is the download rate.", labels=["hive"],
    )  # fmt: skip
    downloading = GaugeMetricFamily(
        "rbee_mesh_hive_downloads_running", "Downloads the hive runs now.", labels=["hive"]
    )
    utilization = GaugeMetricFamily(
        "rbee_mesh_device_utilization_ratio", "How busy each device of the hive was lately, 0 "
        "to 1 (the CPU's time busy; a GPU as NVML samples it).", labels=["hive", "device"],
    )  # fmt: skip
    memory_free = GaugeMetricFamily(
        "rbee_mesh_device_memory_free_bytes", "Free memory of each device of the hive.",
        labels=["hive", "device"],
    )  # fmt: skip
    served = CounterMetricFamily(
        "rbee_mesh_hive_served_bytes", "Bytes of models the hive sent other hives since it "
        "started.", labels=["hive"],
    )  # fmt: skip
    for link in links:  # (a hive's state is free-form: what is not of the shape is passed over)
        name = link.name
        state = link.state
        held = rows(state, "workers")
        for worker_state, n in sorted(Tally(str(w.get("state")) for w in held).items()):
            workers.add_metric([name, worker_state], n)
        silent = link.client.silent_s
        if silent is not None:
            age.add_metric([name], silent)
        models.add_metric([name], link.model_count)
        holding = {str(w.get("model")) for w in held if w.get("state") in ("ready", "busy")}
        loaded.add_metric([name], len(holding))
        downloads = _map(state, "downloads")
        downloaded.add_metric([name], _number(downloads, "bytes"))
        downloading.add_metric([name], _number(downloads, "running"))
        served.add_metric([name], _number(_map(state, "sharing"), "served_bytes"))
        for device in rows(state, "devices"):
            device_id = str(device.get("id"))
            if isinstance(device.get("utilization"), int | float):
                utilization.add_metric([name, device_id], _number(device, "utilization"))
            memory_free.add_metric([name, device_id], _number(device, "memory_free"))
    yield from (workers, age, models, loaded, downloaded, downloading, served, utilization,
                memory_free)  # fmt: skip


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _map(state: dict[str, Any], key: str) -> dict[str, Any]:
    value = state.get(key)
    return value if isinstance(value, dict) else {}


def _number(values: dict[str, Any], key: str) -> float:
    value = values.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
