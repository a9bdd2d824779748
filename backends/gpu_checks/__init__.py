"""Standalone checks and measurements that need a CUDA GPU (torch only); never imported by the gateway."""
