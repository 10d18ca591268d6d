"""How much a model takes once loaded, from its file size alone: memory, and CPU threads.

The queen (placing a job) and the hive (choosing a device) decide with this before any worker
reads the file; a worker, once it can read the GGUF header, checks the real memory figure
(`native.memory_needed`: weights, KV cache and compute buffers) and runs with `threads_for`.
"""

from __future__ import annotations

#: Room for the context and llama.cpp's buffers beyond the weights, in the estimate.
_OVERHEAD_FACTOR = 1.2
_OVERHEAD_BYTES = 256 * 2**20


def estimated_memory(file_size: int) -> int:
    """What loading a model file of `file_size` bytes takes: its size, plus context and
    buffers."""
    return int(file_size * _OVERHEAD_FACTOR) + _OVERHEAD_BYTES


#: Models smaller than this run on one thread (see `threads_for`).
SMALL_MODEL_BYTES = 64 * 1024 * 1024


def threads_for(file_size: int, cores: int) -> int:
    """The threads a worker generates with on the CPU, of a machine's `cores` (logical).

    A model under SMALL_MODEL_BYTES runs on one: ggml threads spin at every barrier; on a busy
    machine a descheduled thread stalls the others (two threads on 2 CPUs with one CPU taken
    ran 100 to 4,000 times slower than one), and a small model gains nothing from them. A
    larger one gets one thread per core, assuming two threads per core past 4 CPUs. Two
    workers whose threads add up to more than the cores both crawl: the queen places by this
    (`scheduler.place`).
    """
    if file_size < SMALL_MODEL_BYTES:
        return 1
    return cores if cores <= 4 else cores // 2
