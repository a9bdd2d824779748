"""TokenFlow gateway: paces streamed LLM answers and schedules engines by client buffer."""

__version__ = "0.1.0"
