"""Streams across replicas: resumption, following another replica's stream, take-overs, shared scheduling.

Every streamed answer is recorded in the session store as it is produced (gateway/lifecycle.py). A client that
reconnects (``Last-Event-ID`` or ``?after=N``) to any replica is served from that replica's Stream: the local
one, or one rebuilt from the store that either follows the owner's log, or, when nobody owns the stream any
more (its client left, or its owner's lease expired), claims it and resubmits the continuation to the engine.
The store's reports (streams claimed, lost, detached; a reset) and the streams published for the engines'
drivers come through here too. docs/replicas.md has the whole picture.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import auth
from .api.errors import ApiError, invalid, not_found
from .api.sse import ChunkEncoder
from .placement import EngineView
from .policy.snapshot import BufferSource
from .resume import NotResumable, continuation_body
from .state import Final, Loaded, PublishedStream, SessionStats, StoreUnavailable, StreamRecord, valid_id
from .streams.base import StreamSpec, pacing_of
from .streams.stream import Stream
from .streams.tokens import Delta

if TYPE_CHECKING:
    from .lifecycle import RequestLifecycle
    from .routing import EngineHandle
    from .services import Services

log = logging.getLogger("tokenflow.relay")


class Relay:
    def __init__(self, svc: Services, requests: RequestLifecycle) -> None:
        self.svc = svc
        self.requests = requests
        self.stats = SessionStats()
        self._remote_seen: dict[str, set[str]] = {}  # engine -> remote stream ids in the last snapshot
        self._views: dict[str, tuple[float, EngineView]] = {}  # engine -> (published at, its placement view)
        store = svc.store
        store.publisher = self._publish
        store.on_claimed = self._on_claimed
        store.on_lost = self._on_lost
        store.on_detached = self._on_detached
        store.local_log = self._local_log
        store.on_reset = self._on_reset

    # ----- resumption -----
    async def resume(self, request: web.Request, sid: str, after: int) -> web.StreamResponse:
        """Serve stream ``sid`` to a client that has its tokens up to ``after``."""
        svc = self.svc
        try:
            valid_id(sid)
        except ValueError:
            raise not_found(f"no stream with id '{sid[:140]}'") from None
        s = svc.streams.get(sid)
        if s is None:
            try:
                loaded = await svc.store.load(sid)
            except StoreUnavailable:
                raise ApiError(503, "the session store is unavailable; retry shortly", type="server_error",
                               code="session_store_unavailable", headers={"Retry-After": "1"}) from None
            s = svc.streams.get(sid)  # another connection may have rebuilt it meanwhile
            if s is None:
                if loaded is None or (loaded.record.key is not None and loaded.record.key != auth.key_name(request)):
                    raise not_found(f"no stream with id '{sid}' (unknown, or expired after it ended)")
                s = await self._rebuild(loaded)
            else:
                self.stats.resumes["local"] += 1
        else:
            self.stats.resumes["local"] += 1
        owner_key = self.requests.keys.get(sid)
        if owner_key is not None and owner_key != auth.key_name(request):
            # Only the API key that started a stream may read it; do not reveal that it exists.
            raise not_found(f"no stream with id '{sid}' (unknown, or expired after it ended)")
        if not isinstance(s, Stream):
            raise ApiError(409, "a non-streaming request cannot be resumed", code="not_resumable")
        refused: ApiError | None = None
        if s.engine not in svc.engines:
            refused = not_found(f"stream '{sid}' belongs to engine '{s.engine}', unknown to this replica")
        elif s.ended and after > s.generated:  # (a running stream may still get there: served from there on)
            refused = invalid(f"stream '{sid}' ended after {s.generated} tokens; cannot resume after {after}",
                              code="resume_beyond_end")
        if refused is not None:
            if not s.attached and sid not in self.requests.pumps:
                self.requests.remove(s)  # rebuilt for this request alone: nobody else holds it
            raise refused
        seq = s.reattach(after, svc.clock())
        return await self.requests.deliver(request, s, seq)

    def _stream_from(self, rec: StreamRecord, loaded: Loaded) -> Stream:
        """A local Stream for a stream the store knows, with what it produced so far."""
        self.requests.admit()
        arrival = self.svc.clock() - max(0.0, time.time() - rec.arrival_wall)
        spec = StreamSpec(id=rec.id, engine=rec.engine, model=rec.model, kind=rec.kind, rate=rec.rate,
                          pacing=pacing_of(rec.pacing), arrival_time=arrival, max_tokens=rec.max_tokens,
                          rate_declared=rec.rate_declared, include_usage=rec.include_usage)
        s = self.requests.new_stream(spec, ChunkEncoder(rec.kind, rec.id, rec.model, rec.created))
        s.restore(loaded.deltas, loaded.final)
        self.requests.keys[rec.id] = rec.key
        return s

    async def _rebuild(self, loaded: Loaded) -> Stream:
        """A stream this replica does not hold: replay it, follow its owner, or take it over."""
        rec = loaded.record
        s = self._stream_from(rec, loaded)
        engine = self.svc.engines.get(rec.engine)
        self.requests.register(s)
        if loaded.final is not None or loaded.state == "finished" or engine is None:
            self.stats.resumes["replay"] += 1
            return s
        if loaded.owner is None:
            try:
                claimed = await self.svc.store.claim(rec.id)
            except StoreUnavailable:
                claimed = False
            if claimed:
                self.stats.resumes["resubmit"] += 1
                await self._continue(s, rec, engine)
                return s
        self.stats.resumes["follow"] += 1
        self.svc.store.follow(rec.id, loaded.cursor)
        return s

    async def _continue(self, s: Stream, rec: StreamRecord, engine: EngineHandle) -> None:
        """Own ``s`` from its stored tokens on: resubmit the rest of the generation to the engine."""
        store = self.svc.store
        store.create(rec, s.deltas)
        try:
            body = continuation_body(rec.kind, rec.body, s.deltas)
        except NotResumable as e:
            store.finish(rec.id, Final(None, 0, (str(e), "not_resumable")))
            return
        if body is None:  # the limit was reached before the request died
            store.finish(rec.id, Final("length", 0))
            return
        try:
            await self.requests.submit(s, engine, body, s.generated)
        except ApiError as e:
            store.finish(rec.id, Final(None, 0, (e.message, e.code or "engine_error")))

    # ----- the store's reports -----
    def _on_claimed(self, sids: list[str]) -> None:
        for sid in sids:
            self.svc.spawn(self._adopt(sid))

    async def _adopt(self, sid: str) -> None:
        """A stream whose owner died is ours now (lease expired): continue its generation."""
        svc = self.svc
        try:
            loaded = await svc.store.load(sid)
        except StoreUnavailable:
            return  # the lease lapses again and a replica retries
        if loaded is None:
            return
        self.stats.takeovers += 1
        engine = svc.engines.get(loaded.record.engine)
        s = svc.streams.get(sid)
        if not isinstance(s, Stream):
            s = self._stream_from(loaded.record, loaded)
            self.requests.register(s)
        else:  # we were following it for a client here: catch up from the log, then read the engine ourselves
            svc.store.unfollow(sid)
            self.requests.on_durable(sid, loaded.deltas, None)
        if loaded.final is not None or engine is None:
            svc.store.finish(sid, loaded.final or Final(None, 0, ("engine unknown to this replica", "engine_unknown")))
            return
        log.info("stream taken over", extra={"stream_id": sid, "engine": loaded.record.engine, "tokens": loaded.tokens})
        await self._continue(s, loaded.record, engine)

    def _on_detached(self, sids: list[str]) -> None:
        for sid in sids:
            self.svc.spawn(self._claim_and_adopt(sid))

    async def _claim_and_adopt(self, sid: str) -> None:
        """A stream we follow for a client here was let go by its owner: continue it here."""
        try:
            if await self.svc.store.claim(sid):
                await self._adopt(sid)
        except StoreUnavailable:
            pass  # the store comes back; the client can reconnect meanwhile

    def _on_lost(self, sids: list[str]) -> None:
        for sid in sids:
            s = self.svc.streams.get(sid)
            self.requests.stop_reading(sid, s.engine if s is not None else None)
            if isinstance(s, Stream):
                log.warning("stream owned by another replica now: closing its client here", extra={"stream_id": sid})
                s.mark_moved()
                if not s.attached:
                    self.requests.remove(s)

    def _local_log(self, sid: str) -> list[Delta] | None:
        s = self.svc.streams.get(sid)
        return list(s.deltas) if isinstance(s, Stream) else None

    def _on_reset(self) -> None:
        """The store lost its data: write again the ended streams whose clients this replica still serves
        (running streams are written again by their owners)."""
        for s in list(self.svc.streams.values()):
            if isinstance(s, Stream) and s.ended and s.id not in self.requests.pumps:
                self.svc.store.rewrite(self.requests.record(s, {}), s.deltas,
                                       Final(s.finish_reason, s.prompt_tokens, s.error))

    def _publish(self) -> dict[str, list[PublishedStream]]:
        now = self.svc.clock()
        off = time.time() - now
        out: dict[str, list[PublishedStream]] = {}
        for s in self.svc.streams.values():
            if s.ended:
                continue
            ft = s.first_token_time
            attached = s.attached if isinstance(s, Stream) else True  # a non-streaming answer's reader is here
            out.setdefault(s.engine, []).append(PublishedStream(
                s.id, s.arrival_time + off, s.max_tokens, s.rate, s.generated, None if ft is None else ft + off,
                s.buffer_tokens(now), attached))
        return out

    # ----- scheduling (ControlLoop coordinator) -----
    def is_driver(self, engine: str) -> bool:
        return self.svc.store.is_driver(engine)

    def streams_for(self, engine: str, local: list[BufferSource], now: float) -> list[BufferSource]:
        """This replica's streams plus those other replicas published; per id the one with a client wins."""
        merged: dict[str, Any] = {s.id: s for s in local}
        remote: set[str] = set()
        for r in self.svc.store.remote_streams(engine, now):
            remote.add(r.id)
            mine = merged.get(r.id)
            if mine is None or (r.attached and not getattr(mine, "attached", True)):
                merged[r.id] = r
        # Remote streams that ended: let the policy drop what it kept for them (local ones do on removal).
        handle = self.svc.engines.get(engine)
        for sid in self._remote_seen.get(engine, set()) - remote:
            if sid not in merged and handle is not None:
                handle.control.policy.forget(sid)
        self._remote_seen[engine] = remote
        return list(merged.values())

    def publish_view(self, view: EngineView) -> None:
        self.svc.store.publish_summary(view.name, view.to_json())

    def published_view(self, engine: str, now: float) -> EngineView | None:
        got = self.svc.store.engine_summary(engine)
        if got is None:
            return None
        summary, at_wall = got
        cached = self._views.get(engine)
        if cached is not None and cached[0] == at_wall:
            return cached[1]  # the same summary: the same view (routing adds its placements to it once)
        try:
            view = EngineView.from_json(summary, at=now - max(0.0, time.time() - at_wall))
        except (KeyError, TypeError, ValueError):
            log.warning("malformed engine summary ignored", extra={"engine": engine})
            return None
        self._views[engine] = (at_wall, view)
        return view

    async def close(self) -> None:
        self.requests.close()
        await self.svc.store.close()

    def info(self) -> dict[str, Any]:
        store = self.svc.store
        drivers = {n: store.is_driver(n) for n in self.svc.engines}
        summaries = {}
        for n in self.svc.engines:
            got = store.engine_summary(n)
            if got is not None:  # what placement knows of the engine from its driver (docs/policies.md)
                v, at = got
                summaries[n] = {"age_s": round(max(0.0, time.time() - at), 3), "kv_blocks_free": v.get("kf"),
                                "kv_blocks_total": v.get("kt"), "live_streams": v.get("ls")}
        return {**store.status(), "drivers": drivers, "summaries": summaries, "resumes": dict(self.stats.resumes),
                "takeovers": self.stats.takeovers}
