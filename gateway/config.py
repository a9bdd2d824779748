"""Gateway configuration: a YAML file, then environment variables on top.

Every option has a default, so the gateway starts with no file at all (embedded simulated engine).
Environment variables use the prefix ``TOKENFLOW_`` and ``__`` between levels, for example
``TOKENFLOW_SERVER__PORT=9000`` or ``TOKENFLOW_SCHEDULER__POLICY=tokenflow``. The file is named by
``--config`` or ``TOKENFLOW_CONFIG``. docs/configuration.md lists every option.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Pacing = Literal["smooth", "phrase", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port (0: any free port)")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="largest request body accepted (413 above)")
    max_streams: int = Field(10000, gt=0, description="concurrent streams before answering 429 with Retry-After")
    shutdown_timeout_s: float = Field(
        5.0, ge=0, le=600,
        description="on SIGTERM, how long open streams may go on before they are cut (clients resume elsewhere); "
        "handlers then get as long again to finish",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="JSON log lines at this level and above")


class StreamsConfig(_Strict):
    default_rate: float = Field(8.0, gt=0, description="tokens/s for clients that declare none (reading class)")
    default_pacing: Pacing = Field("smooth", description="pacing for requests that declare none: smooth, phrase or none")
    min_rate: float = Field(0.1, gt=0, description="smallest declared rate accepted (tokens/s)")
    max_rate: float = Field(1000.0, gt=0, description="largest declared rate accepted (tokens/s)")
    rate_classes: dict[str, float] = Field(
        default_factory=lambda: {"reading": 8.0, "fast-reading": 15.0, "skimming": 20.0, "listening": 3.3},
        description="named rates a request may give instead of a number",
    )
    max_buffered_chunks: int = Field(
        65536, gt=0, description="per-stream bound on chunks held for pacing (the engine is preempted long before)"
    )
    engine_read_ahead_s: float = Field(
        1.0, ge=0,
        description="a paced stream stops reading its engine connection while it holds more than this many seconds of "
        "its reader's tokens not yet sent, and reads again below half of it: the tokens generated meanwhile then come "
        "in one read instead of one read each (0: read every token at once)",
    )

    max_failovers: int = Field(
        2, ge=0, le=16,
        description="how many times one request moves to another engine of its model when its engine fails mid-answer "
        "(killed, frozen, stalled, broken stream): the answer continues there from the tokens already produced, nothing "
        "lost or repeated; beyond this, or with no other engine up, it ends with the engine's error event (0: never)",
    )

    @model_validator(mode="after")
    def _check(self) -> StreamsConfig:
        if self.min_rate > self.max_rate:
            raise ValueError("streams.min_rate must be <= streams.max_rate")
        return self


class SchedulerConfig(_Strict):
    policy: str = Field("tokenflow", description="scheduling policy: tokenflow, fcfs (a plain engine) or andes (docs/policies.md)")
    tick_interval_s: float = Field(0.25, gt=0, le=10, description="control loop period per engine (seconds)")
    knobs: dict[str, Any] = Field(default_factory=dict, description="policy-specific knobs (docs/policies.md)")


class PlacementConfig(_Strict):
    """Which engine serves a new request when several serve its model (docs/policies.md, "Placement")."""

    strategy: Literal["least-outstanding", "tokenflow", "round-robin", "kv-free-first"] = Field(
        "least-outstanding",
        description="least-outstanding (fewest live streams on this replica), tokenflow (soonest predicted first "
        "token, counting the KV and batch slots of streams with deep buffers as free), round-robin or kv-free-first",
    )
    max_age_s: float = Field(
        2.0, gt=0, le=60,
        description="a replica that does not drive an engine places with the summary its driver published, when "
        "younger than this; older (or none): with its own stream counts",
    )


class DrainConfig(_Strict):
    """Measured drain (docs/drain-rate.md): each client's real consumption rate from its connection."""

    enabled: bool = Field(True, description="measure each streamed client's drain from its socket and adapt its effective rate")
    sample_interval_s: float = Field(0.25, gt=0, le=5, description="one sampler pass over every client socket per interval (seconds)")
    window_s: float = Field(6.0, gt=0, description="sliding window of the drain-rate estimate (seconds)")
    min_span_s: float = Field(1.0, gt=0, description="shortest measured span before a drain rate is reported (seconds)")
    stall_after_s: float = Field(3.0, gt=0, description="a client with a waiting backlog and no progress for this long is stalled")
    stall_gap_factor: float = Field(3.0, ge=1, description="for slow clients, stalled only after this many times its usual gap between acknowledgements (at most 4x stall_after_s)")
    probe_after_s: float = Field(2.0, gt=0, description="a client keeping up for this long gets its effective rate raised (probing)")
    probe_factor: float = Field(1.25, gt=1, description="factor of each upward probe, up to the declared rate")
    learn_max_rate: float = Field(20.0, gt=0, description="highest rate probing reaches for clients that declared none (tokens/s)")
    deadband: float = Field(0.15, ge=0, lt=1, description="a measured rate within this fraction of the declared one counts as the declared rate (noise)")


class EngineConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="engine name (metrics label, logs)")
    url: str | None = Field(None, description="base URL serving /v1 and /control/v1; none = embedded simulator")
    models: list[str] = Field(default_factory=list, description="model names routed here; empty = any")
    profile: str = Field("sim-small", description="hardware profile of the embedded simulator")
    control_token: str | None = Field(None, description="bearer token for the engine's control API")
    request_timeout_s: float = Field(3600.0, gt=0, description="longest a single engine request may last")
    connect_timeout_s: float = Field(5.0, gt=0, description="longest wait for a TCP connection to the engine (503 beyond it)")
    first_byte_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for the engine's response head after sending a request (504 beyond it); "
        "engines answer it before generating, so this only bounds a request that reached an unresponsive engine",
    )
    down_after_s: float = Field(
        2.0, gt=0, le=60,
        description="the engine's heartbeat: a control-API state request (one per scheduler tick) that fails or is not "
        "answered within this marks the engine down: new requests get 503 with Retry-After at once (or another engine "
        "of the model) and readiness turns 503; once it stayed unanswered for twice this long, its streams that "
        "received nothing for this long end with an error event; the next answer marks it up again. Liveness is judged here, not by gaps between tokens, because the "
        "scheduler holds streams silent on purpose (docs/operations.md)",
    )
    stall_timeout_s: float = Field(
        15.0, gt=0,
        description="between-chunks timeout: a stream whose request the engine reports running (not held, parked, "
        "waiting or loading), that the gateway is reading and that produced before, ends with an error event after "
        "this long with nothing from the engine",
    )
    max_streams: int | None = Field(
        None, gt=0, description="streams this replica keeps on the engine at once; all engines of a model full: 429 with Retry-After (none: no limit)"
    )
    policy: str | None = Field(
        None, description="scheduling policy for this engine alone (none: scheduler.policy; scheduler.knobs apply only "
        "when it is the same policy)"
    )


class DemoConfig(_Strict):
    """The demo web page (gateway/web/): off by default; ``tokenflow serve --demo`` turns it on."""

    enabled: bool = Field(False, description="serve the demo chat page at / and its burst control under /demo/")
    max_users: int = Field(200, gt=0, le=2000, description="largest burst of simulated users the page may start (per policy)")


class ApiKeyConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="key name (logs, metrics label); never the key itself")
    key: SecretStr | None = Field(None, description="the bearer token itself (or give key_sha256 instead)")
    key_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the bearer token, e.g. from `printf %s KEY \\| sha256sum`"
    )
    rate_class: str | None = Field(
        None, description="rate for this key's requests that declare none: a streams.rate_classes name (default: streams.default_rate)"
    )
    max_streams: int | None = Field(None, gt=0, description="concurrent streams for this key; above it 429 with Retry-After (none: no limit)")
    admin: bool = Field(
        False, description="an operator's key: GET /v1/streams lists every stream and GET /v1/streams/{id} shows any "
        "(other keys see only their own); it cannot read or resume other keys' answers",
    )

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"API key '{self.name}': give exactly one of key or key_sha256")
        return self


class AuthConfig(_Strict):
    keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="API keys for the client API (a list, see auth.keys[]); none here or in keys_file: no key required"
    )
    keys_file: str | None = Field(
        None, description="YAML/JSON file holding a list of keys (fields of auth.keys[]), read at start, added to auth.keys"
    )
    control_token: SecretStr | None = Field(
        None, description="bearer token for the control API of every engine that sets no engines[].control_token"
    )
    retry_after_s: int = Field(
        1, ge=0, le=3600,
        description="Retry-After (seconds) sent with 429 when a stream limit is reached and with 503 when no engine of "
        "the model is up",
    )

    def all_keys(self) -> list[ApiKeyConfig]:
        """``keys`` plus those of ``keys_file`` (read now)."""
        return [*self.keys, *read_keys_file(self.keys_file)] if self.keys_file else list(self.keys)

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        names = [k.name for k in self.all_keys()]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"API key names must be unique: {', '.join(sorted(dup))}")
        return self


def read_keys_file(path: str) -> list[ApiKeyConfig]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except OSError as e:
        raise ValueError(f"auth.keys_file {path}: {e.strerror or e}") from None
    if isinstance(loaded, dict) and "keys" in loaded:
        loaded = loaded["keys"]
    if not isinstance(loaded, list):
        raise ValueError(f"auth.keys_file {path}: expected a list of keys (or a mapping with 'keys')")
    return [ApiKeyConfig.model_validate(k) for k in loaded]


class SessionConfig(_Strict):
    store: Literal["memory", "redis"] = Field(
        "memory", description="where stream records and token logs live: memory (one replica) or redis (several replicas)"
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL; redis://[:password@]host:port/db, rediss:// for TLS"
    )
    redis_password: SecretStr | None = Field(None, description="Redis password (instead of putting it in redis_url)")
    redis_tls_ca_file: str | None = Field(None, description="CA bundle to verify a rediss:// server (default: system CAs)")
    key_prefix: str = Field(
        "tokenflow", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="prefix of every Redis key (one per deployment)"
    )
    replica_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,128}$", description="this replica's name in leases (default: host-pid-random)"
    )
    ttl_s: float = Field(600.0, gt=0, description="how long a stream's record and tokens stay resumable after it ends")
    flush_interval_s: float = Field(
        0.02, gt=0, le=1, description="token writes are batched for this long (one Redis round trip per batch, all streams)"
    )
    lease_ttl_s: float = Field(
        3.0, gt=0, description="a stream whose reading replica did not renew its lease for this long is taken over"
    )
    scan_interval_s: float = Field(1.0, gt=0, description="how often each replica looks for streams to take over")
    driver_lease_ttl_s: float = Field(
        2.0, gt=0, description="an engine's scheduler lease; another replica drives the engine this long after its driver died"
    )
    tick_interval_s: float = Field(
        0.25, gt=0, le=10, description="lease renewal and stream-state publication period (one round trip each)"
    )
    op_timeout_s: float = Field(1.0, gt=0, description="Redis connect/command timeout; beyond it the store is degraded")
    retry_interval_s: float = Field(0.5, gt=0, description="while degraded, how often writes are retried")
    max_backlog_tokens: int = Field(
        1_000_000, gt=0, description="tokens queued for Redis while it is away, at most (oldest ended streams dropped first)"
    )
    max_records: int = Field(100_000, gt=0, description="memory store: stream records kept at most")

    @model_validator(mode="after")
    def _check(self) -> SessionConfig:
        if self.scan_interval_s > self.lease_ttl_s:
            raise ValueError("session.scan_interval_s must be <= session.lease_ttl_s")
        if self.tick_interval_s * 2 > min(self.lease_ttl_s, self.driver_lease_ttl_s):
            raise ValueError("session.tick_interval_s must be at most half of lease_ttl_s and driver_lease_ttl_s")
        return self


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENFLOW_", env_nested_delimiter="__", extra="forbid")

    server: ServerConfig = Field(default_factory=ServerConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    drain: DrainConfig = Field(default_factory=DrainConfig)
    engines: list[EngineConfig] = Field(default_factory=lambda: [EngineConfig(name="sim")])
    auth: AuthConfig = Field(default_factory=AuthConfig)
    session: SessionConfig = Field(default_factory=SessionConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    def policy_for(self, engine: EngineConfig) -> tuple[str, dict[str, Any]]:
        """The policy name and knobs that schedule ``engine``."""
        name = engine.policy or self.scheduler.policy
        return name, (dict(self.scheduler.knobs) if name == self.scheduler.policy else {})

    @field_validator("engines")
    @classmethod
    def _unique(cls, v: list[EngineConfig]) -> list[EngineConfig]:
        names = [e.name for e in v]
        if len(set(names)) != len(names):
            raise ValueError("engine names must be unique")
        if not v:
            raise ValueError("at least one engine is required")
        return v

    @model_validator(mode="after")
    def _auth_refs(self) -> Config:
        for k in self.auth.all_keys():
            if k.rate_class is not None and k.rate_class not in self.streams.rate_classes:
                raise ValueError(f"API key '{k.name}': rate_class '{k.rate_class}' is not in streams.rate_classes")
        if self.auth.control_token is not None:
            token = self.auth.control_token.get_secret_value()
            for e in self.engines:
                if e.control_token is None:
                    e.control_token = token
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file, which wins over defaults.
        return (env_settings, init_settings)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Load the YAML file (if any), apply ``TOKENFLOW_*`` environment variables, then ``overrides``."""
    path = path or os.environ.get("TOKENFLOW_CONFIG")
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        data = loaded
    cfg = Config(**data)
    if overrides:
        merged = cfg.model_dump()
        for dotted, value in overrides.items():
            node = merged
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        cfg = Config.model_validate(merged)
    return cfg


def reference_markdown() -> str:
    """docs/configuration.md, generated from the models above so it cannot drift."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m gateway.config` from `gateway/config.py`; a test checks it is current.",
        "",
        "Sources, later wins: built-in defaults, the YAML file (`--config` or `TOKENFLOW_CONFIG`), environment",
        "variables (`TOKENFLOW_<SECTION>__<OPTION>`; lists and mappings as JSON, e.g.",
        "`TOKENFLOW_ENGINES='[{\"name\": \"a\", \"url\": \"http://gpu1:8000\"}]'`).",
        "",
    ]
    sections: list[tuple[str, type[BaseModel], bool]] = [
        ("server", ServerConfig, False),
        ("streams", StreamsConfig, False),
        ("scheduler", SchedulerConfig, False),
        ("placement", PlacementConfig, False),
        ("drain", DrainConfig, False),
        ("engines", EngineConfig, True),
        ("auth", AuthConfig, False),
        ("auth.keys", ApiKeyConfig, True),
        ("session", SessionConfig, False),
        ("demo", DemoConfig, False),
    ]
    list_env = {"engines": "`TOKENFLOW_ENGINES` (JSON list)", "auth.keys": "`TOKENFLOW_AUTH__KEYS` (JSON list)"}
    list_what = {"engines": "one entry per engine", "auth.keys": "one entry per API key"}
    for name, model, is_list in sections:
        lines += [f"## `{name}`" + (f" (a list; {list_what[name]})" if is_list else ""), ""]
        lines += ["| option | default | environment variable | description |", "|---|---|---|---|"]
        for fname, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
            shown = "required" if f.is_required() else f"`{default!r}`" if not isinstance(default, str) else f"`{default}`"
            env = list_env[name] if is_list else f"`TOKENFLOW_{name.upper()}__{fname.upper()}`"
            lines.append(f"| `{name}{'[]' if is_list else ''}.{fname}` | {shown} | {env} | {f.description or ''} |")
        lines.append("")
    lines += [
        "The default `engines` is one embedded simulated engine: `[{name: sim, profile: sim-small}]`.",
        "",
        "API keys: when `auth.keys` or `auth.keys_file` lists any key, every `/v1/*` request needs",
        "`Authorization: Bearer <key>` (401 otherwise); `/healthz`, `/readyz` and `/metrics` stay open. Secrets",
        "(`key`, `control_token`) are never logged; prefer `key_sha256` and a `keys_file` mounted as a secret.",
        "",
        "Replicas: set `session.store: redis` (and the same `session.redis_url` and `session.key_prefix`) on every",
        "replica so clients can resume on any of them and one replica schedules each engine (docs/replicas.md).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
