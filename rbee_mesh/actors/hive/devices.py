"""The devices of this machine a worker can run on: NVIDIA GPUs (through NVML) and the CPU.

`detect_devices()` goes into every hive heartbeat (once a second), so the expensive part happens
once per process: NVML is initialised once and each GPU's name, compute capability and total
memory are kept; a call then costs one NVML query per GPU for free memory, one read of
/proc/meminfo and one sched_getaffinity.

Without an NVIDIA driver NVML fails to initialise (NVMLError_LibraryNotFound, at once); the report
then holds the CPU only and a one-line note saying why, logged once per process, not on every
heartbeat.

GPU ids are "cuda:N" with N the NVML index, which is PCI bus order. CUDA numbers devices
fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, so a backend that opens "cuda:N" must set
that variable for the numbers to agree. NVML ignores CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import pynvml

log = logging.getLogger("rbee_mesh.actors.hive.devices")


@dataclass(frozen=True)
class Device:
    """A device a worker can be placed on. Memory is in bytes."""

    kind: ClassVar[str]

    id: str
    name: str
    memory_total: int
    memory_free: int
    #: How busy it was lately, 0 to 1 (the CPU: since the last report; a GPU: NVML's last
    #: sample period); None where it cannot be told.
    utilization: float | None = field(default=None, kw_only=True)

    def to_record(self) -> dict[str, Any]:
        """A msgpack-able dict: id, kind, name, memory (bytes) and the fields of its kind."""
        return {"id": self.id, "kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class CpuDevice(Device):
    """The CPU: logical cores this process may run on, and system RAM."""

    kind: ClassVar[str] = "cpu"

    cores: int


@dataclass(frozen=True)
class CudaDevice(Device):
    """An NVIDIA GPU as NVML sees it."""

    kind: ClassVar[str] = "cuda"

    index: int
    #: "major.minor", e.g. "8.6".
    compute_capability: str


@dataclass(frozen=True)
class DeviceReport:
    """Every device of this machine, the CPU first, with a note when GPUs could not be queried."""

    devices: tuple[Device, ...]
    #: Empty when NVML answered; otherwise why there are no GPUs (or fewer) in this report.
    note: str = ""

    @property
    def cpu(self) -> CpuDevice:
        return next(d for d in self.devices if isinstance(d, CpuDevice))

    @property
    def gpus(self) -> tuple[CudaDevice, ...]:
        return tuple(d for d in self.devices if isinstance(d, CudaDevice))

    def refreshed(self) -> DeviceReport:
        """The devices of this machine with their free memory now (a new detect_devices())."""
        return detect_devices()

    def get(self, device_id: str) -> Device | None:
        """The device with this id ("cpu", "cuda:0", ...), if present."""
        return next((d for d in self.devices if d.id == device_id), None)

    def to_record(self) -> dict[str, Any]:
        return {"devices": [d.to_record() for d in self.devices], "note": self.note}


def detect_devices() -> DeviceReport:
    """The devices of this machine with their free memory now. Cheap after the first call."""
    gpus, note = _nvml.gpus()
    if note:
        _log_once(note)
    return DeviceReport(devices=(_cpu(), *gpus), note=note)


def _cpu() -> CpuDevice:
    memory = _meminfo()
    return CpuDevice(
        id="cpu",
        name=_cpu_name(),
        memory_total=memory["MemTotal"],
        memory_free=memory["MemAvailable"],
        cores=len(os.sched_getaffinity(0)),
        utilization=_cpu_load.since_last(),
    )


class _CpuLoad:
    """The machine's CPU time spent busy since the last look, from /proc/stat."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[int, int] | None = None

    def since_last(self) -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as file:
                fields = [int(v) for v in file.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        total, idle = sum(fields[:8]), sum(fields[3:5])  # (idle and iowait)
        with self._lock:
            last, self._last = self._last, (total - idle, total)
        if last is None or total <= last[1]:
            return None
        return round(min(1.0, max(0.0, (total - idle - last[0]) / (total - last[1]))), 3)


_cpu_load = _CpuLoad()


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes. MemAvailable (not MemFree) counts reclaimable page cache."""
    values: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as file:
        for line in file:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key] = int(fields[0]) * (1024 if fields[-1] == "kB" else 1)
    return values


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.machine() or "cpu"


def _gpu_utilization(handle: Any) -> float | None:
    try:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100
    except pynvml.NVMLError:
        return None


@dataclass(frozen=True)
class _Gpu:
    """What does not change while the driver is loaded: fetched once per GPU."""

    handle: Any
    index: int
    name: str
    compute_capability: str
    memory_total: int


class _Nvml:
    """NVML for this process: initialised on first use, never again, whether or not it worked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gpus: list[_Gpu] | None = None
        self._note = ""

    def gpus(self) -> tuple[list[CudaDevice], str]:
        with self._lock:
            if self._gpus is None:
                self._gpus, self._note = self._start()
            gpus, note = self._gpus, self._note
        devices = []
        for gpu in gpus:
            try:
                free = int(pynvml.nvmlDeviceGetMemoryInfo(gpu.handle).free)
            except pynvml.NVMLError as exc:
                # A GPU that stops answering (fallen off the bus, driver reset) is left out of
                # this report rather than shown with made-up numbers.
                note = f"{note}; " if note else ""
                note += f"cuda:{gpu.index} ({gpu.name}) did not answer NVML: {exc}"
                continue
            devices.append(
                CudaDevice(
                    id=f"cuda:{gpu.index}",
                    name=gpu.name,
                    memory_total=gpu.memory_total,
                    memory_free=free,
                    index=gpu.index,
                    compute_capability=gpu.compute_capability,
                    utilization=_gpu_utilization(gpu.handle),
                )
            )
        return devices, note

    @staticmethod
    def _start() -> tuple[list[_Gpu], str]:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            return [], "no NVIDIA driver (the NVML library is not installed): CPU only"
        except pynvml.NVMLError as exc:
            return [], f"NVIDIA GPUs cannot be queried (NVML: {exc}): CPU only"
        gpus = []
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                gpus.append(
                    _Gpu(
                        handle=handle,
                        index=index,
                        name=str(pynvml.nvmlDeviceGetName(handle)),
                        compute_capability=f"{major}.{minor}",
                        memory_total=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    )
                )
        except pynvml.NVMLError as exc:
            return gpus, f"NVML failed while listing GPUs ({exc}); {len(gpus)} listed"
        if not gpus:
            return [], "the NVIDIA driver reports no GPU: CPU only"
        return gpus, ""


_nvml = _Nvml()
_logged_notes: set[str] = set()


def _log_once(note: str) -> None:
    """Log each distinct note once per process: the report repeats it every heartbeat."""
    if note not in _logged_notes:
        _logged_notes.add(note)
        log.info("devices: %s", note)
