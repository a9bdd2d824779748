"""The simulated LLM engine: cost model, pure engine core, HTTP server and virtual-clock runner.

- ``profile``: hardware profiles (configs/profiles/*.yaml) and the step-time formula.
- ``core``: ``EngineCore``, the pure scheduler/KV model (no clock, no I/O).
- ``server``: the OpenAI + engine-control HTTP API on the wall clock (``start_engine``, ``main``).
- ``virtual``: ``VirtualEngine``, a discrete-event runner for benchmarks.
"""

from .core import Emitted, EngineCore, Step
from .profile import Profile, ProfileError, load_profile

__all__ = ["Emitted", "EngineCore", "Profile", "ProfileError", "Step", "load_profile"]
