"""The Redis session store: stream records, token logs and leases shared by every gateway replica.

Data path cost: one pipelined round trip per flush (every ``flush_interval_s`` while tokens are pending) for
all of this replica's streams, carrying their new tokens and the tails of streams it follows; one more per
control tick for leases, published stream states and orphan scans. Tokens reach the local client only once
they are in Redis (so a replica that dies never delivered a token the log lacks), except in degraded mode:
when Redis is unreachable streams keep being served from memory, writes queue (bounded) and are replayed,
in order, when Redis answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..streams.tokens import Delta, Final, tokens_in
from . import scripts
from .base import Loaded, SessionStore, StoreUnavailable, StreamRecord, valid_id
from .memory import default_replica_id
from .published import PublishedStream, RemoteStream
from .scripts import Refused

if TYPE_CHECKING:
    from ..config import SessionConfig

log = logging.getLogger("tokenflow.state")

_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError, rexc.BusyLoadingError,
           rexc.ReadOnlyError)


@dataclass(slots=True)
class _Outbox:
    """Writes queued for one stream this replica owns, in order."""

    record: StreamRecord
    stored: int = 0  # tokens durable in Redis
    create: bool = True  # the record still has to be written
    deltas: list[Delta] = field(default_factory=list)
    sunk: int = 0  # how many of ``deltas`` were already handed to the sink (degraded mode)
    end: Final | None = None
    end_state: str | None = None  # finished | detached
    end_sunk: bool = False
    ended_at: float | None = None
    rewrite: bool = False  # an ended stream written again after Redis lost it (best effort, no ownership)


class RedisStore(SessionStore):
    kind = "redis"

    def __init__(self, cfg: SessionConfig, engines: list[str]) -> None:
        super().__init__(cfg.replica_id or default_replica_id())
        self.cfg = cfg
        self.prefix = cfg.key_prefix
        self.engines = [valid_id(e) for e in engines]
        kwargs: dict[str, Any] = dict(
            socket_timeout=cfg.op_timeout_s,
            socket_connect_timeout=cfg.op_timeout_s,
            retry=Retry(NoBackoff(), 0),  # fail fast: the store has its own reconnect cadence
            health_check_interval=0,
            client_name=f"tokenflow-{self.replica_id}"[:100],
        )
        if cfg.redis_password is not None:
            kwargs["password"] = cfg.redis_password.get_secret_value()
        if cfg.redis_tls_ca_file:
            kwargs["ssl_ca_certs"] = cfg.redis_tls_ca_file
        self.redis: Redis = Redis.from_url(cfg.redis_url, **kwargs)
        # EVALSHA by the scripts' SHA-1 (known without Redis); NOSCRIPT -> SCRIPT LOAD and retry.
        self._sha: dict[str, str] = {n: hashlib.sha1(src.encode()).hexdigest() for n, src in scripts.ALL.items()}
        self.roundtrips = 0  # pipelines and single commands sent (benchmarks read it)
        self.errors = 0
        self._out: dict[str, _Outbox] = {}
        self._owned: set[str] = set()
        self._follow: dict[str, str] = {}  # sid -> last log entry id seen
        self._driver_until: dict[str, float] = {}
        self._remote: dict[str, list[tuple[PublishedStream, float]]] = {}
        self._stale_pubs: dict[str, list[str]] = {}
        self._summary_out: dict[str, dict[str, Any]] = {}  # engine -> summary to write with the next tick
        self._connected_since: float | None = None
        self._dirty = asyncio.Event()
        self._urgent = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The loops also stop on this flag: on Python 3.11 a cancel() that lands while an inner timeout fires
        # (asyncio.wait_for / timeout, redis-py's socket timeouts) can be swallowed, and a loop that only
        # listened for CancelledError then ran on and close() waited for it forever.
        self._closing = False
        self._next_scan = 0.0
        self._backlog_tokens = 0
        self.tick_interval_s = cfg.tick_interval_s
        # Redis' data epoch: a random value set once per deployment; if it changes, Redis lost its data
        # (a restart without persistence) and what this replica still holds must be written again.
        self._epoch: bytes | None = None

    # ----- keys (ids are validated by the callers' entry points) -----
    def _k(self, kind: str, ident: str) -> str:
        return f"{self.prefix}:{kind}:{ident}"

    @property
    def _live(self) -> str:
        return f"{self.prefix}:live"

    # ----- lifecycle -----
    async def start(self) -> None:
        try:
            await self._load_scripts()
            self._ok()
        except _ERRORS as e:
            self._fail(e)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_loop(), name="store-flush"),
                       loop.create_task(self._tick_loop(), name="store-tick")]

    async def close(self) -> None:
        self._closing = True
        self._dirty.set()  # wake an idle flush loop
        pending = {t for t in self._tasks if not t.done()}
        for t in pending:
            t.cancel()
        # Bounded: a loop ends within one iteration of the flag even if its cancel was swallowed.
        if pending:
            _, pending = await asyncio.wait(pending, timeout=2 * self.cfg.op_timeout_s + self.tick_interval_s)
        for t in pending:
            log.warning("session store task did not stop on close", extra={"task": t.get_name()})
        try:
            await asyncio.wait_for(self._flush(), self.cfg.op_timeout_s)
            pipe = self.redis.pipeline(transaction=False)
            for e in self.engines:
                self._evalsha(pipe, "RESIGN", [self._k("drv", e)], [self.replica_id])
                pipe.hdel(self._k("pub", e), self.replica_id)
            if self._owned:
                self._evalsha(pipe, "YIELD", [self._live], [self.replica_id, self.prefix, *self._owned])
            await asyncio.wait_for(self._execute(pipe), self.cfg.op_timeout_s)
        except (*_ERRORS, rexc.RedisError):
            pass
        try:
            await asyncio.wait_for(self.redis.aclose(), self.cfg.op_timeout_s)
        except (*_ERRORS, rexc.RedisError):
            pass

    async def _load_scripts(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        names = list(scripts.ALL)
        for n in names:
            pipe.script_load(scripts.ALL[n])
        shas = await self._execute(pipe)
        self._check(shas)

    async def _reload(self) -> bool:
        """Load the scripts again (Redis restarted); False if Redis is unreachable."""
        try:
            await self._load_scripts()
            return True
        except (*_ERRORS, rexc.RedisError) as e:
            self._fail(e)
            return False

    def _evalsha(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        pipe.evalsha(self._sha[name], len(keys), *keys, *args)

    async def _execute(self, pipe: Any) -> list[Any]:
        self.roundtrips += 1
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _ok(self) -> None:
        if self.degraded or self._connected_since is None:
            if self.degraded:
                log.warning("session store reconnected", extra={"store": "redis"})
            self._connected_since = time.monotonic()
        self.degraded = False

    def _fail(self, e: BaseException) -> None:
        self.errors += 1
        if not self.degraded:
            log.warning("session store unavailable: serving from memory", extra={"store": "redis", "error": str(e)})
        self.degraded = True
        self._connected_since = None

    def _settled(self) -> bool:
        """Connected long enough that every live owner renewed its leases: expired leases are real."""
        return self._connected_since is not None and time.monotonic() - self._connected_since >= self.cfg.lease_ttl_s

    @staticmethod
    def _check(results: list[Any]) -> None:
        for r in results:
            if isinstance(r, rexc.NoScriptError):
                raise r
            if isinstance(r, _ERRORS):
                raise r

    # ----- owner side -----
    def create(self, rec: StreamRecord, deltas: Sequence[Delta] | None = None) -> None:
        sid = valid_id(rec.id)
        ob = _Outbox(rec)
        if deltas:  # a takeover: the log already holds these
            ob.create, ob.stored = False, tokens_in(deltas)
        self._out[sid] = ob
        self._owned.add(sid)
        self._dirty.set()

    def adopt(self, sid: str) -> None:
        self._owned.add(sid)

    def extend(self, sid: str, deltas: list[Delta]) -> None:
        ob = self._out.get(sid)
        if ob is None:
            self.sink(sid, deltas, None)
            return
        if ob.stored == 0 and not ob.deltas:
            self._urgent.set()  # the first token: write it now rather than after a batching interval
        ob.deltas.extend(deltas)
        self._backlog_tokens += len(deltas)
        if self.degraded:  # serve from memory now; the write waits for Redis
            self._sink_queued(sid, ob, None)
            self._bound_backlog()
        self._dirty.set()

    def _sink_queued(self, sid: str, ob: _Outbox, final: Final | None) -> None:
        """Degraded mode: hand the sink every queued delta it has not had, then ``final`` if given. Not only the
        newest: deltas queued before the store failed may still be in a write that had not answered yet, and the
        stream must get them first (skipping them would lose them: they count as sunk from now on)."""
        new = ob.deltas[ob.sunk:]
        ob.sunk = len(ob.deltas)
        if final is not None:
            ob.end_sunk = True
        if new or final is not None:
            self.sink(sid, new, final)

    def pending(self, sid: str) -> list[Delta]:
        ob = self._out.get(sid)
        return ob.deltas[ob.sunk:] if ob is not None else []

    def finish(self, sid: str, final: Final) -> None:
        self._end(sid, final, "finished")

    def release(self, sid: str) -> None:
        self._end(sid, None, "detached")

    def _end(self, sid: str, final: Final | None, state: str) -> None:
        ob = self._out.get(sid)
        if ob is None:
            if final is not None:
                self.sink(sid, [], final)
            return
        ob.end, ob.end_state, ob.ended_at = final, state, time.monotonic()
        if self.degraded and final is not None:
            self._sink_queued(sid, ob, final)
        self._dirty.set()

    def forget(self, sid: str) -> None:
        self._follow.pop(sid, None)

    def _bound_backlog(self) -> None:
        """While Redis is away, queued writes are bounded: the oldest ended streams' writes go first."""
        if self._backlog_tokens <= self.cfg.max_backlog_tokens:
            return
        for sid, ob in sorted(self._out.items(), key=lambda kv: kv[1].ended_at or float("inf")):
            if self._backlog_tokens <= self.cfg.max_backlog_tokens:
                break
            self._backlog_tokens -= len(ob.deltas)
            del self._out[sid]
            self._owned.discard(sid)
            log.warning("session store backlog full: dropped a stream's queued writes", extra={"stream_id": sid})

    # ----- followers -----
    def follow(self, sid: str, cursor: str) -> None:
        self._follow[valid_id(sid)] = cursor
        self._dirty.set()

    def unfollow(self, sid: str) -> None:
        self._follow.pop(sid, None)

    # ----- flushing -----
    async def _flush_loop(self) -> None:
        while not self._closing:
            try:
                if not self._out and not self._follow:
                    self._dirty.clear()
                    await self._dirty.wait()
                if self.degraded:
                    await asyncio.sleep(self.cfg.retry_interval_s)
                else:  # batch for flush_interval_s, unless a stream's first token is waiting (time to first token)
                    try:
                        await asyncio.wait_for(self._urgent.wait(), self.cfg.flush_interval_s)
                    except TimeoutError:
                        pass
                self._urgent.clear()
                await self._flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bug stop the data path
                log.exception("session store flush failed")
                await asyncio.sleep(self.cfg.retry_interval_s)

    async def _flush(self) -> None:
        """One pipeline: this replica's queued writes (records, tokens, ends) and the tails of the streams it
        follows; then each command's result applied."""
        if self.degraded and not await self._reconnect():
            self._sink_unsunk()
            return
        pipe = self.redis.pipeline(transaction=False)
        plan = self._queue_writes(pipe) + self._queue_follow(pipe)
        if not plan:
            return
        results = await self._send(pipe)
        if results is None:
            if self.degraded:
                self._sink_unsunk()
            return
        for (sid, what, extra), res in zip(plan, results):
            self._apply_write(sid, what, extra, res)
        if any(ob.deltas or ob.create or ob.end_state for ob in self._out.values()):
            self._dirty.set()

    def _queue_writes(self, pipe: Any) -> list[tuple[str, str, int]]:
        """CREATE, APPEND and END for every stream with queued writes; the plan says what each command was."""
        plan: list[tuple[str, str, int]] = []  # (sid, what, tokens appended)
        ttl_ms = int(self.cfg.ttl_s * 1000)
        lease_ms = int(self.cfg.lease_ttl_s * 1000)
        now = time.monotonic()
        for sid, ob in list(self._out.items()):
            if ob.ended_at is not None and now - ob.ended_at > self.cfg.ttl_s:
                self._drop(sid)  # ended long ago and never written: it no longer matters
                continue
            if ob.create:
                self._evalsha(pipe, "CREATE", [self._k("s", sid), self._live],
                              [self.replica_id, ob.record.to_json(), lease_ms, sid])
                plan.append((sid, "create", 0))
            if ob.deltas:
                payload = orjson.dumps([list(d) for d in ob.deltas])
                self._evalsha(pipe, "APPEND", [self._k("s", sid), self._k("t", sid)],
                              [self.replica_id, ob.stored, payload, ob.deltas[-1][0] - ob.stored])
                plan.append((sid, "append", len(ob.deltas)))
            if ob.end_state is not None:
                fin = (ob.end or Final(None, 0)).to_json()
                self._evalsha(pipe, "END", [self._k("s", sid), self._k("t", sid), self._live],
                              [self.replica_id, fin, ttl_ms, sid, ob.end_state])
                plan.append((sid, "end", 0))
        return plan

    def _queue_follow(self, pipe: Any) -> list[tuple[str, str, int]]:
        """One XREAD for the new entries of every stream this replica follows."""
        if not self._follow:
            return []
        pipe.xread({self._k("t", sid): cur for sid, cur in self._follow.items()}, count=10000)
        return [("", "follow", 0)]

    def _apply_write(self, sid: str, what: str, appended: int, res: Any) -> None:
        if isinstance(res, Exception):
            log.warning("session store write failed", extra={"stream_id": sid, "error": str(res)})
            return
        if what == "follow":
            self._on_follow(res)
            return
        ob = self._out.get(sid)
        if ob is None:
            return
        res = int(res)
        if res == Refused.NOT_OWNER:
            self._drop(sid)
            if not ob.rewrite:  # someone else wrote a rewritten stream first: fine
                self.on_lost([sid])
            return
        if res == Refused.GONE:  # Redis restarted empty: write the record again, whole
            self._recreate(sid, ob)
            return
        if what == "create":
            ob.create = False
        elif what == "append":
            self._appended(sid, ob, appended, res)
        elif what == "end":
            if ob.end is not None and not ob.end_sunk:
                self.sink(sid, [], ob.end)
            self._drop(sid)

    def _appended(self, sid: str, ob: _Outbox, n: int, res: int) -> None:
        """The first ``n`` queued deltas are in Redis (or, on a gap, dropped): hand the ones not yet delivered
        locally to the sink."""
        done = ob.deltas[:n]
        del ob.deltas[:n]
        self._backlog_tokens -= n
        new = done[ob.sunk:]
        ob.sunk = max(0, ob.sunk - n)
        if res == Refused.GAP:
            log.warning("session store log gap: writes dropped", extra={"stream_id": sid})
        else:
            ob.stored = res
        if new:
            self.sink(sid, new, None)

    async def _send(self, pipe: Any) -> list[Any] | None:
        """Execute ``pipe``; None when it could not run: Redis is unreachable (degraded now), or it lost its
        scripts (loaded again; the next flush retries at once)."""
        try:
            results = await self._execute(pipe)
            self._check(results)
        except rexc.NoScriptError:  # Redis restarted and lost its script cache
            await self._reload()
            self._dirty.set()
            return None
        except (*_ERRORS, rexc.RedisError) as e:
            self._fail(e)
            return None
        self._ok()
        return results

    def _drop(self, sid: str) -> None:
        ob = self._out.pop(sid, None)
        if ob is not None:
            self._backlog_tokens -= len(ob.deltas)
        self._owned.discard(sid)

    def _sink_unsunk(self) -> None:
        for sid, ob in list(self._out.items()):
            self._sink_queued(sid, ob, ob.end if not ob.end_sunk else None)
        self._bound_backlog()

    def _recreate(self, sid: str, ob: _Outbox) -> None:
        full = self.local_log(sid)  # what the local stream holds: every delta already handed to the sink
        if full is None:
            self._drop(sid)
            return
        log.warning("session record lost by Redis: writing it again", extra={"stream_id": sid})
        unsunk = ob.deltas[ob.sunk:]
        self._backlog_tokens += len(full) + len(unsunk) - len(ob.deltas)
        ob.deltas = list(full) + unsunk
        ob.sunk = len(full)
        ob.create, ob.stored = True, 0
        self._dirty.set()

    def _apply_epoch(self, value: bytes | None) -> None:
        if self._epoch is not None and value != self._epoch:
            log.warning("Redis lost its data: writing held streams again", extra={"store": "redis"})
            # Every stream this replica owns is written again now, whole: not on its next write, which may be
            # far off (a stream reading ahead or held by the policy writes nothing for a while, and one whose
            # client leaves meanwhile is gone from memory by then).
            for sid, ob in list(self._out.items()):
                if not ob.create and not ob.rewrite:
                    self._recreate(sid, ob)
            self.on_reset()
        self._epoch = value

    async def _reconnect(self) -> bool:
        """After an outage, before anything else: did Redis keep its data? True once it answers."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"{self.prefix}:epoch", uuid.uuid4().hex, nx=True)
        pipe.get(f"{self.prefix}:epoch")
        try:
            res = await self._execute(pipe)
            self._check(res)
        except (*_ERRORS, rexc.RedisError) as e:
            self._fail(e)
            return False
        self._apply_epoch(res[1])
        self._ok()
        return True

    def rewrite(self, rec: StreamRecord, deltas: Sequence[Delta], final: Final) -> None:
        """Write an ended stream again, whole (after Redis lost it), so clients can still resume it anywhere."""
        sid = valid_id(rec.id)
        if sid in self._out:
            return
        ob = _Outbox(rec, deltas=list(deltas), sunk=len(deltas), end=final, end_state="finished", end_sunk=True,
                     rewrite=True)
        self._backlog_tokens += len(deltas)
        self._out[sid] = ob
        self._dirty.set()

    def _on_follow(self, res: Any) -> None:
        if not res:
            return
        plen = len(self.prefix) + 3
        detached: list[str] = []
        for name, entries in (res.items() if isinstance(res, dict) else res):
            key = name.decode() if isinstance(name, bytes) else name
            sid = key[plen:]
            if sid not in self._follow:
                continue
            deltas: list[Delta] = []
            final: Final | None = None
            for eid, fields in entries:
                self._follow[sid] = eid.decode() if isinstance(eid, bytes) else eid
                d = fields.get(b"d")
                if d is not None:
                    deltas.extend((int(e), t, ids) for e, t, ids in orjson.loads(d))
                f = fields.get(b"f")
                if f is not None:
                    final = Final.from_json(f)
                if b"x" in fields and final is None:
                    detached.append(sid)
            if final is not None:
                self._follow.pop(sid, None)
            if deltas or final is not None:
                self.sink(sid, deltas, final)
        if detached:
            self.on_detached(detached)

    # ----- any replica -----
    async def load(self, sid: str) -> Loaded | None:
        sid = valid_id(sid)
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=True)  # one consistent view of record and log
            pipe.hgetall(self._k("s", sid))
            pipe.xrange(self._k("t", sid))
            pipe.zscore(self._live, sid)
            pipe.time()
            try:
                h, entries, score, now = await self._execute(pipe)
                self._check([h, entries, score, now])
                break
            except rexc.ConnectionError as e:
                # After a Redis restart the pool still holds connections the server closed; the first use of
                # one fails at once. The read is safe to repeat on a fresh connection, and a client's resume
                # should not get a 503 for it.
                if attempt == 2:
                    self._fail(e)
                    raise StoreUnavailable(str(e)) from None
            except (*_ERRORS, rexc.RedisError) as e:
                self._fail(e)
                raise StoreUnavailable(str(e)) from None
        self._ok()
        if not h or b"rec" not in h:
            return None
        rec = StreamRecord.from_json(h[b"rec"])
        deltas: list[Delta] = []
        final = None
        cursor = "0-0"
        for eid, fields in entries:
            cursor = eid.decode() if isinstance(eid, bytes) else eid
            if b"d" in fields:
                deltas.extend((int(e), t, ids) for e, t, ids in orjson.loads(fields[b"d"]))
            if b"f" in fields:
                final = Final.from_json(fields[b"f"])
        state = h.get(b"state", b"running").decode()
        if final is None and b"final" in h:
            final = Final.from_json(h[b"final"])
        owner = h.get(b"owner")
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        alive = owner is not None and score is not None and float(score) > now_ms
        return Loaded(rec, state, deltas, final, owner.decode() if alive and owner else None, cursor)

    async def claim(self, sid: str) -> bool:
        sid = valid_id(sid)
        pipe = self.redis.pipeline(transaction=False)
        self._evalsha(pipe, "CLAIM", [self._live],
                      [self.replica_id, int(self.cfg.lease_ttl_s * 1000), self.prefix, 1,
                       "1" if self._settled() else "0", sid])
        try:
            (res,) = await self._execute(pipe)
            self._check([res])
        except rexc.NoScriptError:
            if not await self._reload():
                raise StoreUnavailable("Redis is unreachable") from None
            return await self.claim(sid)
        except (*_ERRORS, rexc.RedisError) as e:
            self._fail(e)
            raise StoreUnavailable(str(e)) from None
        if res:
            self._owned.add(sid)
        return bool(res)

    # ----- scheduling: one pipeline per tick -----
    async def _tick_loop(self) -> None:
        while not self._closing:
            t0 = time.monotonic()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session store tick failed")
            await asyncio.sleep(max(0.0, self.tick_interval_s - (time.monotonic() - t0)))

    async def _tick(self) -> None:
        """One pipeline per control tick: the data epoch, this replica's stream leases, per engine the driver
        lease and the published stream states, and (now and then) a scan for orphans to take over."""
        if self.degraded and not await self._reconnect():
            return
        pipe = self.redis.pipeline(transaction=False)
        wall = time.time()
        plan = (self._queue_epoch(pipe) + self._queue_renew(pipe) + self._queue_engines(pipe, wall)
                + self._queue_claim_scan(pipe))
        t_sent = time.monotonic()
        results = await self._send(pipe)
        if results is None:
            return
        for (what, arg), res in zip(plan, results):
            if isinstance(res, Exception):
                log.warning("session store tick command failed", extra={"op": what, "error": str(res)})
            elif what == "epoch":
                self._apply_epoch(res)
            elif what == "renew":
                self._renewed(res)
            elif what == "driver":
                self._driver_until[arg] = t_sent + self.cfg.driver_lease_ttl_s * 0.8 if int(res) == 1 else 0.0
            elif what == "pubs":
                self._read_pubs(arg, res, wall)
            elif what == "summary":
                self._read_summary(arg, res)
            elif what == "claim":
                claimed = [x.decode() for x in res]
                if claimed:
                    self._owned.update(claimed)
                    self.on_claimed(claimed)

    def _queue_epoch(self, pipe: Any) -> list[tuple[str, str]]:
        pipe.set(f"{self.prefix}:epoch", uuid.uuid4().hex, nx=True)  # fresh each time: a reset always shows
        pipe.get(f"{self.prefix}:epoch")
        return [("epoch_set", ""), ("epoch", "")]

    def _queue_renew(self, pipe: Any) -> list[tuple[str, str]]:
        owned = sorted(self._owned)
        if not owned:
            return []
        self._evalsha(pipe, "RENEW", [self._live],
                      [self.replica_id, int(self.cfg.lease_ttl_s * 1000), self.prefix, *owned])
        return [("renew", "")]

    def _queue_engines(self, pipe: Any, wall: float) -> list[tuple[str, str]]:
        """Per engine: take or keep its driver lease, publish this replica's streams on it, read everyone's."""
        plan: list[tuple[str, str]] = []
        me = self.replica_id
        try:
            published = self.publisher()
        except Exception:
            log.exception("publishing stream states failed")
            published = {}
        for e in self.engines:
            self._evalsha(pipe, "DRIVER", [self._k("drv", e)], [me, int(self.cfg.driver_lease_ttl_s * 1000)])
            plan.append(("driver", e))
            states = [p.to_list() for p in published.get(e, ())]
            pipe.hset(self._k("pub", e), me, orjson.dumps({"t": wall, "s": states}))
            pipe.pexpire(self._k("pub", e), 60_000)
            plan += [("pub", e), ("pexpire", e)]
            stale = self._stale_pubs.pop(e, None)
            if stale:
                pipe.hdel(self._k("pub", e), *stale)
                plan.append(("hdel", e))
            pipe.hgetall(self._k("pub", e))
            plan.append(("pubs", e))
            out = self._summary_out.pop(e, None)
            if out is not None and self.is_driver(e):
                pipe.set(self._k("sum", e), orjson.dumps({"t": wall, "r": me, "v": out}), px=60_000)
                plan.append(("sum_set", e))
            pipe.get(self._k("sum", e))
            plan.append(("summary", e))
        return plan

    def _queue_claim_scan(self, pipe: Any) -> list[tuple[str, str]]:
        """Every ``scan_interval_s``, once leases are trustworthy: claim streams whose owner's lease expired."""
        if not (self._settled() and time.monotonic() >= self._next_scan):
            return []
        self._next_scan = time.monotonic() + self.cfg.scan_interval_s
        self._evalsha(pipe, "CLAIM", [self._live],
                      [self.replica_id, int(self.cfg.lease_ttl_s * 1000), self.prefix, 100, "1"])
        return [("claim", "")]

    def _renewed(self, res: Any) -> None:
        """RENEW's answer: streams another replica owns now, and records Redis lost."""
        # A stream that ended while the renewal was in flight is not lost: its END ran first.
        live = {sid for sid, ob in self._out.items() if ob.end_state is None}
        lost = [x.decode() for x in res[0] if x.decode() in live]
        missing = [x.decode() for x in res[1] if x.decode() in live]
        for sid in lost:
            self._drop(sid)
        if lost:
            self.on_lost(lost)
        for sid in missing:
            ob = self._out.get(sid)
            if ob is not None:
                self._recreate(sid, ob)

    def _read_pubs(self, engine: str, h: dict[bytes, bytes], wall: float) -> None:
        fresh: list[tuple[PublishedStream, float]] = []
        stale: list[str] = []
        horizon = max(3 * self.tick_interval_s, 2.0)
        for rid, raw in h.items():
            r = rid.decode()
            if r == self.replica_id:
                continue
            try:
                obj = orjson.loads(raw)
                t = float(obj["t"])
                if wall - t > 30:
                    stale.append(r)
                if wall - t > horizon:
                    continue
                fresh += [(PublishedStream.from_list(v), t) for v in obj["s"]]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
                stale.append(r)
        self._remote[engine] = fresh
        if stale:
            self._stale_pubs[engine] = stale

    def _read_summary(self, engine: str, raw: bytes | None) -> None:
        if raw is None:
            self._summaries.pop(engine, None)
            return
        try:
            obj = orjson.loads(raw)
            summary, t = obj["v"], float(obj["t"])
            if not isinstance(summary, dict):
                raise TypeError("summary is not an object")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("malformed engine summary ignored", extra={"engine": engine})
            return
        mine = self._summaries.get(engine)
        if mine is None or mine[1] <= t:  # the driver's own newer one, not yet written, wins
            self._summaries[engine] = (summary, t)

    def publish_summary(self, engine: str, summary: dict[str, Any]) -> None:
        super().publish_summary(engine, summary)
        self._summary_out[engine] = summary

    def is_driver(self, engine: str) -> bool:
        return time.monotonic() < self._driver_until.get(engine, 0.0)

    def remote_streams(self, engine: str, now: float) -> Iterable[RemoteStream]:
        wall = time.time()
        return [RemoteStream.from_published(p, t, wall, now) for p, t in self._remote.get(engine, ())]

    def status(self) -> dict[str, Any]:
        return {**super().status(), "owned": len(self._owned), "following": len(self._follow),
                "queued_tokens": max(0, self._backlog_tokens)}
