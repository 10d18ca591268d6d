"""Models and inference: GGUF files today; inference backends arrive with a later issue."""

from rbee_mesh.inference.gguf_file import (
    GgufFile,
    GgufInfo,
    open_gguf,
    read_gguf_info,
    write_tiny_gguf,
)

__all__ = ["GgufFile", "GgufInfo", "open_gguf", "read_gguf_info", "write_tiny_gguf"]
