"""The stream data path across replicas: who reads the engine, who delivers to the client, and resumption.

Producer side: the replica that owns a stream reads its engine stream (``gateway.pump.Pump``) and appends every
delta to the session store; the store hands deltas back (``_sink``) once durable, and they reach the local
:class:`~gateway.streams.stream.Stream`. Delivery side: a client writer sends what its Stream releases. A
client that reconnects (``Last-Event-ID`` or ``?after=N``) to any replica is served from that replica's
Stream: the local one, or one rebuilt from the store that either follows the owner's log, or, when nobody
owns the stream any more (its client left, or its owner's lease expired), claims it and resubmits the
continuation to the engine. docs/replicas.md has the whole picture.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import auth
from .api.errors import ApiError, not_found
from .api.sse import ChunkEncoder
from .engines.client import EngineError
from .policy.snapshot import BufferSource
from .pump import Pump
from .resume import NotResumable, continuation_body, parse_event_id
from .state import Final, PublishedStream, SessionStore, StoreUnavailable, StreamRecord, valid_id
from .state.base import Loaded
from .streams.phrase_stream import stream_class
from .streams.stream import Delta, Stream

if TYPE_CHECKING:
    from .app import EngineHandle, Gateway

log = logging.getLogger("tokenflow.relay")

# How long a resubmission retries while the engine still holds the dead request's id.
_DUPLICATE_RETRY_S = 5.0


class Relay:
    def __init__(self, gw: "Gateway", store: SessionStore) -> None:
        self.gw = gw
        self.store = store
        self.pumps: dict[str, asyncio.Task[None]] = {}
        store.sink = self._sink
        store.publisher = self._publish
        store.on_claimed = self._on_claimed
        store.on_lost = self._on_lost
        store.local_log = self._local_log  # type: ignore[method-assign]
        store.on_reset = self._on_reset  # type: ignore[method-assign]
        store.on_detached = self._on_detached  # type: ignore[attr-defined]
        self.keys: dict[str, str | None] = {}  # stream -> API key name that may resume it
        self.resumes = {"local": 0, "follow": 0, "resubmit": 0, "replay": 0}
        self.takeovers = 0
        self._remote_seen: dict[str, set[str]] = {}  # engine -> remote stream ids in the last snapshot

    # ----- new streams -----
    def record(self, stream: Stream, body: dict[str, Any]) -> StreamRecord:
        wall = time.time() - (self.gw.loop_time() - stream.arrival_time)
        return StreamRecord(stream.id, stream.engine, stream.model, stream.kind, stream.rate, stream.pacing,
                            stream.rate_declared, stream.include_usage, stream.max_tokens, stream.created,
                            arrival_wall=wall, key=self.keys.get(stream.id), body=body)

    @staticmethod
    def _key_of(request: web.Request) -> str | None:
        key = request.get(auth.KEY_ATTR)
        return None if key is None else key.name

    async def serve_new(self, request: web.Request, stream: Stream, engine: "EngineHandle", body: dict[str, Any]
                        ) -> web.StreamResponse:
        """A new streaming request: record it, submit it to the engine, deliver it to this client."""
        self.keys[stream.id] = self._key_of(request)
        self.store.create(self.record(stream, body))
        self._register(stream)
        try:
            await self._submit(stream, engine, body, 0)
        except BaseException as e:
            if isinstance(e, ApiError):
                self.store.finish(stream.id, Final(None, 0, (e.message, e.code or "engine_error")))
            else:
                self.store.release(stream.id)
            self._remove(stream)
            raise
        stream.attached = True
        return await self._deliver(request, stream, engine, stream.attach_seq)

    async def _submit(self, stream: Stream, engine: "EngineHandle", body: dict[str, Any], start: int) -> None:
        """Open the engine stream (retrying while the engine still knows a dead request's id) and pump it."""
        upstream_body = {**body, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
                         "vllm_xargs": {"tokenflow_id": stream.id}}
        deadline = self.gw.loop_time() + (_DUPLICATE_RETRY_S if start else 0.0)
        while True:
            try:
                upstream = await engine.client.open_stream(stream.kind, upstream_body)
                break
            except EngineError as e:
                code = ((e.body or {}).get("error") or {}).get("code") if isinstance(e.body, dict) else None
                if code == "duplicate_id" and self.gw.loop_time() < deadline:
                    await self.gw._abort(engine, stream.id)  # the old request outlived its reader: end it
                    await asyncio.sleep(0.1)
                    continue
                self.gw.metrics.errors.labels("engine_unavailable" if e.status >= 500 else "engine_rejected").inc()
                if e.status >= 500:
                    raise ApiError(e.status, str(e), type="server_error", code="engine_unavailable") from None
                raise ApiError(e.status, str(e), code="engine_rejected") from None
        stream.owned = True
        task = Pump(self.gw, engine, upstream, stream, start).start()
        self.pumps[stream.id] = task
        task.add_done_callback(lambda t, s=stream: self._pump_done(s, t))

    def _pump_done(self, stream: Stream, task: asyncio.Task[None]) -> None:
        if self.pumps.get(stream.id) is task:
            del self.pumps[stream.id]
        if not stream.attached and self.gw.streams.get(stream.id) is stream:
            self._remove(stream)

    # ----- delivery -----
    async def _deliver(self, request: web.Request, stream: Stream, engine: "EngineHandle", seq: int
                       ) -> web.StreamResponse:
        try:
            return await self.gw._stream_to_client(request, stream, engine, seq)
        finally:
            self._writer_exit(stream, seq)

    def _writer_exit(self, stream: Stream, seq: int) -> None:
        if stream.attach_seq != seq:
            return  # a newer connection serves this stream now
        stream.attached = False
        if self.gw.streams.get(stream.id) is not stream:
            return
        sid = stream.id
        pump = self.pumps.get(sid)
        if pump is not None and not pump.done():
            if stream.client_done:
                return  # everything was sent; the pump ends on its own (removal then)
            # The client left mid-stream: free the engine now. The stream stays resumable from the store; a
            # reconnecting client gets the continuation resubmitted.
            pump.cancel()
            engine = self.gw.engines.get(stream.engine)
            if engine is not None:
                self.gw._spawn(self.gw._abort(engine, sid))
            self.store.release(sid)
        elif not stream.owned:
            self.store.unfollow(sid)
        self._remove(stream)

    # ----- resumption -----
    async def resume_header(self, request: web.Request, value: str) -> web.StreamResponse:
        try:
            sid, after = parse_event_id(value)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_last_event_id", param="Last-Event-ID") from None
        return await self.resume(request, sid, after)

    async def resume_endpoint(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{id}/events``: from ``Last-Event-ID`` if sent (EventSource reconnects), else ``?after=``."""
        sid = request.match_info["id"]
        header = request.headers.get("Last-Event-ID")
        if header:
            try:
                hsid, after = parse_event_id(header)
            except ValueError as e:
                raise ApiError(400, str(e), code="invalid_last_event_id", param="Last-Event-ID") from None
            if hsid != sid:
                raise ApiError(400, "Last-Event-ID names another stream", code="invalid_last_event_id",
                               param="Last-Event-ID")
        else:
            raw = request.query.get("after", "0")
            if not raw.isdigit() or len(raw) > 12:
                raise ApiError(400, "'after' must be a non-negative integer (tokens already received)",
                               code="invalid_value", param="after")
            after = int(raw)
        return await self.resume(request, sid, after)

    async def resume(self, request: web.Request, sid: str, after: int) -> web.StreamResponse:
        try:
            valid_id(sid)
        except ValueError:
            raise not_found(f"no stream with id '{sid[:140]}'") from None
        s = self.gw.streams.get(sid)
        if s is None:
            try:
                loaded = await self.store.load(sid)
            except StoreUnavailable:
                raise ApiError(503, "the session store is unavailable; retry shortly", type="server_error",
                               code="session_store_unavailable", headers={"Retry-After": "1"}) from None
            s = self.gw.streams.get(sid)  # another connection may have rebuilt it meanwhile
            if s is None:
                if loaded is None or (loaded.record.key is not None and loaded.record.key != self._key_of(request)):
                    raise not_found(f"no stream with id '{sid}' (unknown, or expired after it ended)")
                s = await self._rebuild(loaded)
            else:
                self.resumes["local"] += 1
        else:
            self.resumes["local"] += 1
        owner_key = self.keys.get(sid)
        if owner_key is not None and owner_key != self._key_of(request):
            # Only the API key that started a stream may read it; do not reveal that it exists.
            raise not_found(f"no stream with id '{sid}' (unknown, or expired after it ended)")
        if s.collected is not None:
            raise ApiError(409, "a non-streaming request cannot be resumed", code="not_resumable")
        engine = self.gw.engines.get(s.engine)
        if engine is None:
            raise not_found(f"stream '{sid}' belongs to engine '{s.engine}', unknown to this replica")
        seq = s.reattach(after, self.gw.loop_time())
        return await self._deliver(request, s, engine, seq)

    def _stream_from(self, rec: StreamRecord, loaded: Loaded) -> Stream:
        gw = self.gw
        if len(gw.streams) >= gw.cfg.server.max_streams:
            raise ApiError(429, "the gateway is at its stream limit; retry shortly", type="rate_limit_error",
                           code="too_many_streams", headers={"Retry-After": "1"})
        arrival = gw.loop_time() - max(0.0, time.time() - rec.arrival_wall)
        s = stream_class(rec.pacing)(rec.id, rec.engine, rec.model, rec.kind, rec.rate, rec.pacing, arrival, rec.max_tokens,  # type: ignore[arg-type]
                   ChunkEncoder(rec.kind, rec.id, rec.model, rec.created), gw._clock, rate_declared=rec.rate_declared,
                   include_usage=rec.include_usage, max_pending=gw.cfg.streams.max_buffered_chunks,
                   read_ahead_s=gw.cfg.streams.engine_read_ahead_s)
        f = loaded.final
        s.restore(loaded.deltas, None if f is None else (f.reason, f.prompt_tokens, f.error))
        s.owned = False
        self.keys[rec.id] = rec.key
        return s

    async def _rebuild(self, loaded: Loaded) -> Stream:
        """A stream this replica does not hold: replay it, follow its owner, or take it over."""
        rec = loaded.record
        s = self._stream_from(rec, loaded)
        engine = self.gw.engines.get(rec.engine)
        if loaded.final is not None or loaded.state == "finished" or engine is None:
            self.resumes["replay"] += 1
            self._register(s)
            return s
        self._register(s)
        if loaded.owner is None:
            try:
                claimed = await self.store.claim(rec.id)
            except StoreUnavailable:
                claimed = False
            if claimed:
                self.resumes["resubmit"] += 1
                await self._continue(s, rec, engine)
                return s
        self.resumes["follow"] += 1
        self.store.follow(rec.id, loaded.cursor)
        return s

    async def _continue(self, s: Stream, rec: StreamRecord, engine: "EngineHandle") -> None:
        """Own ``s`` from its stored tokens on: resubmit the rest of the generation to the engine."""
        self.store.create(rec, s.deltas)
        try:
            body = continuation_body(rec.kind, rec.body, s.deltas)
        except NotResumable as e:
            self.store.finish(rec.id, Final(None, 0, (str(e), "not_resumable")))
            return
        if body is None:  # the limit was reached before the request died
            self.store.finish(rec.id, Final("length", 0))
            return
        try:
            await self._submit(s, engine, body, s.generated)
        except ApiError as e:
            self.store.finish(rec.id, Final(None, 0, (e.message, e.code or "engine_error")))

    def _on_claimed(self, sids: list[str]) -> None:
        for sid in sids:
            self.gw._spawn(self._adopt(sid))

    async def _adopt(self, sid: str) -> None:
        """A stream whose owner died is ours now (lease expired): continue its generation."""
        try:
            loaded = await self.store.load(sid)
        except StoreUnavailable:
            return  # the lease lapses again and a replica retries
        if loaded is None:
            return
        self.takeovers += 1
        engine = self.gw.engines.get(loaded.record.engine)
        s = self.gw.streams.get(sid)
        if s is None:
            s = self._stream_from(loaded.record, loaded)
            self._register(s)
        else:  # we were following it for a client here: catch up from the log, then read the engine ourselves
            self.store.unfollow(sid)
            self._sink(sid, loaded.deltas, None)
        if loaded.final is not None or engine is None:
            self.store.finish(sid, loaded.final or Final(None, 0, ("engine unknown to this replica", "engine_unknown")))
            return
        log.info("stream taken over", extra={"stream_id": sid, "engine": loaded.record.engine, "tokens": loaded.tokens})
        await self._continue(s, loaded.record, engine)

    def _on_detached(self, sids: list[str]) -> None:
        for sid in sids:
            self.gw._spawn(self._claim_and_adopt(sid))

    async def _claim_and_adopt(self, sid: str) -> None:
        """A stream we follow for a client here was let go by its owner: continue it here."""
        try:
            if await self.store.claim(sid):
                await self._adopt(sid)
        except StoreUnavailable:
            pass  # the store comes back; the client can reconnect meanwhile

    def _on_lost(self, sids: list[str]) -> None:
        for sid in sids:
            s = self.gw.streams.get(sid)
            pump = self.pumps.pop(sid, None)
            if pump is not None and not pump.done():
                pump.cancel()
                engine = self.gw.engines.get(s.engine) if s is not None else None
                if engine is not None:
                    self.gw._spawn(self.gw._abort(engine, sid))
            if s is not None:
                log.warning("stream owned by another replica now: closing its client here", extra={"stream_id": sid})
                s.owned = False
                s.mark_lost()
                if not s.attached:
                    self._remove(s)

    # ----- store callbacks -----
    def _sink(self, sid: str, deltas: list[Delta], final: Final | None) -> None:
        """Tokens (and the end) that are durable, or that degraded mode serves from memory: deliver them."""
        s = self.gw.streams.get(sid)
        if s is None:
            return
        now = self.gw.loop_time()
        if deltas:
            s.on_deltas(deltas, now)
        if final is not None and not s.upstream_done:
            if final.error is not None:
                s.on_error(final.error[0], final.error[1], now)
            else:
                s.on_finished(final.reason or "stop", final.prompt_tokens, None, now)
            if not s.attached and s.id not in self.pumps:
                self._remove(s)

    def _local_log(self, sid: str) -> list[Delta] | None:
        s = self.gw.streams.get(sid)
        return None if s is None else list(s.deltas)

    def _on_reset(self) -> None:
        """The store lost its data: write again the ended streams whose clients this replica still serves
        (running streams are written again by their owners)."""
        rewrite = getattr(self.store, "rewrite", None)
        if rewrite is None:
            return
        for s in list(self.gw.streams.values()):
            if s.collected is None and s.upstream_done and s.id not in self.pumps:
                rewrite(self.record(s, {}), s.deltas, Final(s.finish_reason, s.prompt_tokens, s.error))

    def _publish(self) -> dict[str, list[PublishedStream]]:
        now = self.gw.loop_time()
        off = time.time() - now
        out: dict[str, list[PublishedStream]] = {}
        for s in self.gw.streams.values():
            if s.upstream_done:
                continue
            ft = s.first_token_time
            out.setdefault(s.engine, []).append(PublishedStream(
                s.id, s.arrival_time + off, s.max_tokens, s.rate, s.generated, None if ft is None else ft + off,
                s.buffer_tokens(now), s.attached or s.collected is not None))
        return out

    # ----- scheduling (ControlLoop coordinator) -----
    def is_driver(self, engine: str) -> bool:
        return self.store.is_driver(engine)

    def streams_for(self, engine: str, local: list[Stream], now: float) -> list[BufferSource]:
        """This replica's streams plus those other replicas published; per id the one with a client wins."""
        merged: dict[str, Any] = {s.id: s for s in local}
        remote: set[str] = set()
        for r in self.store.remote_streams(engine, now):
            remote.add(r.id)
            mine = merged.get(r.id)
            if mine is None or (r.attached and not getattr(mine, "attached", True)):
                merged[r.id] = r
        # Remote streams that ended: let the policy drop what it kept for them (local ones do on removal).
        handle = self.gw.engines.get(engine)
        for sid in self._remote_seen.get(engine, set()) - remote:
            if sid not in merged and handle is not None:
                handle.control.policy.forget(sid)
        self._remote_seen[engine] = remote
        return list(merged.values())

    # ----- bookkeeping -----
    def _register(self, s: Stream) -> None:
        self.gw.streams[s.id] = s
        self.gw.metrics.streams_active.labels(s.engine).inc()

    def _remove(self, s: Stream) -> None:
        gw = self.gw
        if gw.streams.get(s.id) is not s:
            return
        del gw.streams[s.id]
        self.keys.pop(s.id, None)
        self.store.forget(s.id)
        engine = gw.engines.get(s.engine)
        if engine is not None:
            engine.control.policy.forget(s.id)
        gw.metrics.streams_active.labels(s.engine).dec()
        gw.metrics.stall_seconds.labels(s.engine).inc(s.reader.stall_time_at(gw.loop_time()))

    async def close(self) -> None:
        for t in list(self.pumps.values()):
            t.cancel()
        await self.store.close()

    def info(self) -> dict[str, Any]:
        drivers = {n: self.store.is_driver(n) for n in self.gw.engines}
        return {**self.store.status(), "drivers": drivers, "resumes": dict(self.resumes), "takeovers": self.takeovers}

