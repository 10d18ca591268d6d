"""rbee-mesh: every box on a LAN, GPU or CPU, as one LLM inference mesh."""

__version__ = "0.1.0"
