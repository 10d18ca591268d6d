"""How much memory a model takes once loaded, estimated from its file size alone.

The queen (placing a job) and the hive (choosing a device) decide with this before any worker
reads the file; a worker, once it can read the GGUF header, checks the real figure
(`native.memory_needed`: weights, KV cache and compute buffers).
"""

from __future__ import annotations

#: Room for the context and llama.cpp's buffers beyond the weights, in the estimate.
_OVERHEAD_FACTOR = 1.2
_OVERHEAD_BYTES = 256 * 2**20


def estimated_memory(file_size: int) -> int:
    """What loading a model file of `file_size` bytes takes: its size, plus context and
    buffers."""
    return int(file_size * _OVERHEAD_FACTOR) + _OVERHEAD_BYTES
