"""Streams: per-request token buffers, the reader model and the pacing clock."""
