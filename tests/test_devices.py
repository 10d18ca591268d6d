"""Device detection, for real on this machine: the CPU path, and NVML failing to load.

A machine with an NVIDIA driver skips the "no driver" tests: they describe the machine, not code
that could be faked without mocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgpack
import pytest

from rbee_mesh.actors.hive.devices import CpuDevice, detect_devices


def _nvml_loads() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


needs_no_nvidia_driver = pytest.mark.skipif(
    _nvml_loads(), reason="this machine has an NVIDIA driver"
)


def test_cpu_device_reports_this_process_cores_and_system_memory() -> None:
    report = detect_devices()
    cpu = report.cpu
    assert isinstance(cpu, CpuDevice)
    assert report.devices[0] is cpu and report.get("cpu") is cpu
    assert cpu.cores == len(os.sched_getaffinity(0))
    with open("/proc/meminfo", encoding="ascii") as file:
        total_kib = int(next(line for line in file if line.startswith("MemTotal:")).split()[1])
    assert cpu.memory_total == total_kib * 1024
    assert 0 < cpu.memory_free <= cpu.memory_total
    assert cpu.name
    record = cpu.to_record()
    assert record["id"] == "cpu" and record["kind"] == "cpu"
    assert {"name", "memory_total", "memory_free", "cores"} <= record.keys()
    assert msgpack.unpackb(msgpack.packb(report.to_record())) == report.to_record()


@needs_no_nvidia_driver
def test_without_nvidia_driver_report_is_cpu_only_with_a_note() -> None:
    report = detect_devices()
    assert [d.id for d in report.devices] == ["cpu"]
    assert report.gpus == ()
    assert "no NVIDIA driver" in report.note
    assert "CPU only" in report.note
    assert report.to_record()["note"] == report.note


@needs_no_nvidia_driver
def test_missing_driver_note_is_logged_once_per_process_without_traceback() -> None:
    # A fresh process, because "once per process" is the behaviour under test.
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format='%(message)s')\n"
        "from rbee_mesh.actors.hive.devices import detect_devices\n"
        "for _ in range(5):\n"
        "    detect_devices()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    lines = [line for line in result.stderr.splitlines() if "NVIDIA" in line]
    assert lines == ["devices: no NVIDIA driver (the NVML library is not installed): CPU only"]
    assert "Traceback" not in result.stderr


def test_detect_devices_is_cheap_enough_for_every_heartbeat() -> None:
    detect_devices()  # the first call initialises NVML (or learns that it cannot)
    started = time.perf_counter()
    for _ in range(100):
        detect_devices()
    per_call = (time.perf_counter() - started) / 100
    # A heartbeat is 1 s; measured here at about 0.1 ms per call. 10 ms leaves room for a
    # loaded CI machine while still catching a re-initialisation on every call.
    assert per_call < 0.010
