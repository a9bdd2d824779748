"""TokenFlow control plugin for vLLM.

Adds per-request preempt / resume / prefetch / priority / abort and a state report to a stock vLLM
server, without editing vLLM:

- ``tokenflow_vllm.scheduler``: a ``Scheduler`` subclass (``--scheduler-cls``) that applies the commands
  at step boundaries and keeps held requests out of every queue;
- ``tokenflow_vllm.engine_hook``: a general plugin that adds ``EngineCore.tokenflow_control`` so the
  API server reaches the scheduler through ``call_utility_async``;
- ``tokenflow_vllm.endpoints``: an endpoint plugin serving ``/control/v1`` (docs/engine-control-api.md);
- ``tokenflow_vllm.offload``: a portable offloading spec/worker (CUDA side stream, or plain CPU copies)
  and an eviction policy that pins held requests' host KV.
"""

__version__ = "0.1.0"
