"""The engine control API v1 (docs/engine-control-api.md): its constants and its state, typed.

The gateway's engine client speaks it, the policies read the state it parses here, and the contract suite
(tests/contract) checks every engine against the same constants. Pure: no I/O, no gateway imports, so the
policy layer may depend on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

VERSION = "1"
VERSION_HEADER = "X-TokenFlow-Control-Version"
STATE_PATH = "/control/v1/state"
COMMANDS_PATH = "/control/v1/commands"

Op = Literal["preempt", "resume", "prefetch", "priority", "abort"]
OPS: tuple[Op, ...] = ("preempt", "resume", "prefetch", "priority", "abort")
MAX_COMMANDS = 1024  # per POST /control/v1/commands; a longer batch is split into several calls
ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"  # request ids the gateway assigns (``vllm_xargs.tokenflow_id``)
ID_RE = re.compile(ID_PATTERN)
ABORTED = "aborted"  # the status in a successful abort's result (the id is unknown afterwards)


class EngineStatus(StrEnum):
    """A request's status inside the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    LOADING = "loading"
    HELD = "held"
    PARKED = "parked"


STATUSES = frozenset(s.value for s in EngineStatus)
_STATUS = {s.value: s for s in EngineStatus}
# An enum member read through its class is a Python-level descriptor call (3.11); parsing reads it per request.
_WAITING = EngineStatus.WAITING


@dataclass(frozen=True, slots=True)
class EngineView:
    """The engine part of the state: what the policy knows of one engine."""

    name: str
    block_size: int
    max_num_seqs: int
    kv_bytes_per_token: int
    kv_device_capacity_tokens: int
    kv_device_used_tokens: int
    kv_host_capacity_tokens: int
    kv_host_used_tokens: int
    step_time_s: float | None
    decode_tokens_per_s: float | None
    prefill_tokens_per_s: float | None
    h2d_bytes_per_s: float | None
    d2h_bytes_per_s: float | None
    # Recent steps without prompt work (null where the engine does not report it: step_time_s then).
    decode_step_time_s: float | None = None

    @classmethod
    def from_json(cls, e: Mapping[str, Any]) -> EngineView:
        return cls(
            name=str(e.get("name", "")),
            block_size=int(e.get("block_size") or 16),
            max_num_seqs=int(e.get("max_num_seqs") or 256),
            kv_bytes_per_token=int(e.get("kv_bytes_per_token") or 0),
            kv_device_capacity_tokens=int(e.get("kv_device_capacity_tokens") or 0),
            kv_device_used_tokens=int(e.get("kv_device_used_tokens") or 0),
            kv_host_capacity_tokens=int(e.get("kv_host_capacity_tokens") or 0),
            kv_host_used_tokens=int(e.get("kv_host_used_tokens") or 0),
            step_time_s=_opt_float(e.get("step_time_s")),
            decode_tokens_per_s=_opt_float(e.get("decode_tokens_per_s")),
            prefill_tokens_per_s=_opt_float(e.get("prefill_tokens_per_s")),
            h2d_bytes_per_s=_opt_float(e.get("h2d_bytes_per_s")),
            d2h_bytes_per_s=_opt_float(e.get("d2h_bytes_per_s")),
            decode_step_time_s=_opt_float(e.get("decode_step_time_s")),
        )


# RequestState and CommandResult are read-only by contract but not ``frozen``: a frozen dataclass's __init__ sets
# each field through object.__setattr__ (about 6x slower), and every control tick parses one per request and
# one per command (docs/benchmarks.md, "Scheduler cost").
@dataclass(slots=True)
class RequestState:
    """One request as the engine reports it (the fields the gateway uses)."""

    id: str
    status: EngineStatus = EngineStatus.WAITING
    priority: int = 0
    prompt_tokens: int = 0
    kv_device_tokens: int = 0
    kv_host_tokens: int = 0
    preemptions: int = 0

    @classmethod
    def from_json(cls, r: Mapping[str, Any]) -> RequestState:
        # positional, in field order: keywords make the constructor about 3x slower (one per request per tick)
        return cls(
            str(r["id"]),
            _STATUS.get(r.get("status", "waiting"), _WAITING),
            int(r.get("priority") or 0),
            int(r.get("prompt_tokens") or 0),
            int(r.get("kv_device_tokens") or 0),
            int(r.get("kv_host_tokens") or 0),
            int(r.get("preemptions") or 0),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineState:
    """``GET /control/v1/state``, parsed once by the engine client and shared by the control loop and the
    snapshot builder."""

    engine: EngineView
    requests: Mapping[str, RequestState] = field(default_factory=dict)  # by request id
    counters: Mapping[str, float] = field(default_factory=dict)  # monotonic since engine start

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> EngineState:
        eng = obj.get("engine") or {}
        reqs = (RequestState.from_json(r) for r in obj.get("requests", ()))
        counters = {str(k): v for k, v in (eng.get("counters") or {}).items() if isinstance(v, (int, float))}
        return cls(engine=EngineView.from_json(eng), requests={r.id: r for r in reqs}, counters=counters)


@dataclass(slots=True, kw_only=True)  # read-only: see RequestState
class CommandResult:
    """One command's result from ``POST /control/v1/commands``."""

    id: str | None
    op: str | None
    ok: bool
    status: str | None = None  # the request's status right after the command (when ok)
    error_code: str | None = None  # not_found | invalid_command | ... (when not ok)

    @classmethod
    def from_json(cls, r: Mapping[str, Any]) -> CommandResult:
        ok = bool(r.get("ok", False))
        code = None if ok else str((r.get("error") or {}).get("code", "unknown"))
        return cls(id=r.get("id"), op=r.get("op"), ok=ok, status=r.get("status"), error_code=code)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
