"""Host-memory KV offload pieces: a portable offloading spec/worker and a pinning eviction policy."""
