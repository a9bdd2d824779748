"""Rules of the tokenflow policy, each on a small hand-built snapshot."""

from __future__ import annotations

import hashlib
import json

from bench.tickcost import apply, stressed_snapshot
from gateway.policy import make_policy
from gateway.policy.knobs import TokenFlowKnobs
from gateway.policy.tokenflow import TokenFlowPolicy
from gateway.policy.types import Decision, EngineStatus, EngineView, Snapshot, StreamView

from .tokenflow_cases import BURSTS, RECORDING, SEQUENCES, outcome, runs

R, W, H, P, L = EngineStatus.RUNNING, EngineStatus.WAITING, EngineStatus.HELD, EngineStatus.PARKED, EngineStatus.LOADING
NOW = 100.0
# sha256 of the decisions on the tick-cost benchmark's snapshots (see the last test)
BENCH_DIGEST = "13c521f89457acb2357a35073f16f2715036e4c80e7824cf6247e74393f0b344"
TICK = 0.5


def engine(capacity: int = 10_000, seqs: int = 64, step: float | None = 0.02) -> EngineView:
    # 1 KiB of KV per token at 1 GB/s: reloading 1,000 tokens takes ~1 ms; prefill 10k tok/s.
    return EngineView("e", 16, seqs, 1024, capacity, 0, 1_000_000, 0, step, 1000.0, 10_000.0, 1e9, 1e9)


def sv(i: str, status: EngineStatus, *, buf: float = 0.0, rate: float = 10.0, prompt: int = 1000, gen: int = 100,
       started: bool = True, max_tokens: int = 2000, arrival: float | None = None, host: int | None = None
       ) -> StreamView:
    # A started request arrived long ago; a new one, unless told otherwise, just now (it has not waited yet).
    arrival = arrival if arrival is not None else (50.0 if started else NOW)
    ctx = prompt + gen if started else prompt
    dev = ctx if status in (R, P) else 0
    return StreamView(i, status, arrival, rate, prompt, gen if started else 0, buf, 60.0 if started else None,
                      max_tokens, dev, ctx if host is None else host)


def snap(*streams: StreamView, eng: EngineView | None = None) -> Snapshot:
    return Snapshot(eng or engine(), tuple(streams), TICK)


def ops(ds: list[Decision]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for d in ds:
        out.setdefault(d.op, set()).add(d.id)
    return out


def test_registered_with_knob_overrides() -> None:
    p = make_policy("tokenflow", conservativeness=3)
    assert isinstance(p, TokenFlowPolicy) and p.knobs.conservativeness == 3.0
    assert make_policy("tokenflow").knobs == TokenFlowKnobs()


def test_no_action_without_stress() -> None:
    # Everyone runs, nothing waits: the engine is left alone, even with a nearly empty buffer.
    s = snap(sv("a", R, buf=0.0), sv("b", R, buf=500.0), sv("c", R, buf=3.0))
    assert TokenFlowPolicy().decide(s, NOW) == []


def test_new_request_preempts_a_well_buffered_runner() -> None:
    # Memory holds two requests of ~1,100 tokens; a third, new one waits: it is urgent (empty buffer),
    # so the runner with 60 s of buffer gives way; the one with 1 s keeps running.
    s = snap(sv("rich", R, buf=600.0), sv("poor", R, buf=10.0), sv("new", W, started=False),
             eng=engine(capacity=2600))
    o = ops(TokenFlowPolicy().decide(s, NOW))
    assert o.get("preempt") == {"rich"}
    assert "new" not in o.get("preempt", set())


def test_safety_rule_blocks_unsafe_preempts() -> None:
    # Same pressure, but both runners' buffers last less than mu * (evict + load + tick) = 2 * (~0 + 0.5):
    # neither may be paused, so the new request waits.
    s = snap(sv("a", R, buf=5.0), sv("b", R, buf=8.0), sv("new", W, started=False), eng=engine(capacity=2600))
    preempted = ops(TokenFlowPolicy().decide(s, NOW)).get("preempt", set())
    assert not preempted & {"a", "b"}
    # Just above the bound for one of them (buffer 12 tokens at 10 tok/s = 1.2 s > 1.0 s + copy time): that one may go.
    s2 = snap(sv("a", R, buf=5.0), sv("b", R, buf=12.0), sv("new", W, started=False), eng=engine(capacity=2600))
    assert ops(TokenFlowPolicy().decide(s2, NOW)).get("preempt") == {"b"}


def test_conservativeness_scales_the_safety_margin() -> None:
    s = snap(sv("a", R, buf=5.0), sv("b", R, buf=25.0), sv("new", W, started=False), eng=engine(capacity=2600))
    assert ops(TokenFlowPolicy(conservativeness=2.0).decide(s, NOW)).get("preempt") == {"b"}
    assert "b" not in ops(TokenFlowPolicy(conservativeness=8.0).decide(s, NOW)).get("preempt", set())


def test_not_started_requests_come_before_paused_ones_that_can_wait() -> None:
    # Room for one more request: a new arrival (empty buffer) and a paused request with 30 s of buffer
    # compete; the new one goes first and the paused one is not resumed.
    s = snap(sv("run", R, buf=5.0), sv("paused", H, buf=300.0), sv("new", W, started=False),
             eng=engine(capacity=2500))
    o = ops(TokenFlowPolicy().decide(s, NOW))
    assert "paused" not in o.get("resume", set()) and "paused" not in o.get("prefetch", set())
    assert "new" not in o.get("preempt", set())


def test_paused_request_about_to_run_dry_beats_a_new_one() -> None:
    s = snap(sv("run", R, buf=5.0), sv("paused", H, buf=2.0), sv("new", W, started=False), eng=engine(capacity=2500))
    o = ops(TokenFlowPolicy().decide(s, NOW))
    assert "paused" in o.get("resume", set())
    assert "new" in o.get("preempt", set())  # kept out of the engine's queue: no room for it this tick


def test_reload_versus_recompute() -> None:
    # With its KV on the host, a paused request is copied back (prefetch) and run when it lands (resume);
    # without a host copy it is resumed and the engine recomputes it.
    s = snap(sv("hosted", H, buf=0.0), sv("lost", H, buf=0.0, host=0))
    ds = TokenFlowPolicy().decide(s, NOW)
    assert [(d.op, d.id) for d in ds if d.id == "hosted"] == [("prefetch", "hosted"), ("resume", "hosted")]
    assert [(d.op, d.id) for d in ds if d.id == "lost"] == [("resume", "lost")]


def test_recomputation_is_bounded_per_tick() -> None:
    # Ten paused requests without a host copy, all about to run dry, room for all: recomputing one costs
    # 1,100 tokens / 10k tok/s = 0.11 s of engine time, so a switch budget of 0.5 of a 0.5 s tick takes two
    # (one always goes); the rest stay paused for a later tick. Reloads from the host (no recomputation) are
    # not limited by it.
    lost = [sv(f"lost{i}", H, buf=0.0, host=0) for i in range(10)]
    hosted = [sv(f"hosted{i}", H, buf=0.0) for i in range(10)]
    eng = engine(capacity=100_000)
    ds = TokenFlowPolicy(switch_budget=0.5).decide(snap(*lost, *hosted, eng=eng), NOW)
    resumed = ops(ds).get("resume", set())
    assert len(resumed & {s.id for s in lost}) == 2
    assert {s.id for s in hosted} <= resumed
    ds = TokenFlowPolicy(switch_budget=0.0).decide(snap(*lost, eng=eng), NOW)
    assert len(ops(ds).get("resume", set())) == 1  # never none: a budget too small must not stop everything
    ds = TokenFlowPolicy(switch_budget=10.0).decide(snap(*lost, eng=eng), NOW)
    assert len(ops(ds).get("resume", set())) == 10


def test_prefetch_timing() -> None:
    # Batch slots are full with runners that cannot be paused; device memory is free. A paused request is
    # prefetched only once its buffer would run dry within mu * (load + prefetch_ticks * tick) = ~2 s.
    eng = engine(capacity=100_000, seqs=2)
    base = (sv("a", R, buf=1.0), sv("b", R, buf=1.0))
    far = TokenFlowPolicy().decide(snap(*base, sv("p", H, buf=100.0), eng=eng), NOW)  # 10 s of buffer
    assert "p" not in ops(far).get("prefetch", set())
    near = TokenFlowPolicy().decide(snap(*base, sv("p", H, buf=15.0), eng=eng), NOW)  # 1.5 s of buffer
    assert ops(near).get("prefetch") == {"p"}
    assert "p" not in ops(near).get("resume", set())  # no slot: it waits parked on the device


def test_a_new_request_that_waited_overtakes_runners_about_to_run_dry() -> None:
    # Overload: two slots, both runners nearly empty (negative slack), a new request waits. Just arrived,
    # or within its grace, it waits (the runners are more urgent); once it has waited longer than the
    # grace plus their switch margin, a runner gives way (the one with more buffer), instead of the new
    # request waiting for a whole answer.
    eng = engine(capacity=100_000, seqs=2)
    g = TokenFlowKnobs().first_token_grace_s
    runners = (sv("a", R, buf=2.0), sv("b", R, buf=4.0))
    fresh = ops(TokenFlowPolicy().decide(snap(*runners, sv("new", W, started=False), eng=eng), NOW))
    assert not fresh.get("preempt", set()) & {"a", "b"}
    grace = ops(TokenFlowPolicy().decide(snap(*runners, sv("new", W, started=False, arrival=NOW - g + 0.1), eng=eng),
                                         NOW))
    assert not grace.get("preempt", set()) & {"a", "b"}
    late = ops(TokenFlowPolicy().decide(snap(*runners, sv("new", W, started=False, arrival=NOW - g - 3.0), eng=eng),
                                        NOW))
    assert late.get("preempt", set()) & {"a", "b"} == {"b"}
    assert "new" not in late.get("preempt", set())


def test_overload_resumes_the_most_urgent_first_and_paces_new_requests() -> None:
    # Decode capacity: 1 / 0.05 s per sequence x ~4.6 sequences in memory = ~92 tok/s. Admitted requests
    # want 20 x 10 tok/s = 200 tok/s: overload (the working set, shrunk toward the 5 running, has room).
    # There is no first-come-first-served fallback: paused requests are resumed by urgency (time to empty),
    # not by age; the new request waits outside the engine while the admitted readers' buffers could not
    # carry it (held, no KV), and is admitted once they can.
    eng = engine(capacity=10_000, seqs=6, step=0.05)
    runners = [sv(f"r{i}", R, buf=500.0, arrival=10.0 + i) for i in range(5)]
    paused = [sv(f"p{i}", H, buf=float(300 - 5 * i), arrival=20.0 + i) for i in range(15)]
    pol = TokenFlowPolicy()
    ds = pol.decide(snap(*runners, *paused, sv("new", W, started=False, arrival=90.0), eng=eng), NOW)
    assert pol.info.mode == "overload"
    assert any(d.id == "new" and d.reason == "working_set" for d in ds)  # not admitted: held out of the engine
    resumed = [d.id for d in ds if d.op == "resume"]
    assert set(resumed) == {f"p{i}" for i in range(9, 15)}  # 6 slots: the 6 emptiest buffers
    # Deep buffers (1,000 s each): the same engine can carry the newcomer, which is admitted at once.
    deep = [sv(f"p{i}", H, buf=10_000.0, arrival=20.0 + i) for i in range(15)]
    o2 = ops(TokenFlowPolicy().decide(snap(*runners, *deep, sv("new", W, started=False, arrival=90.0), eng=eng), NOW))
    assert "new" not in o2.get("preempt", set())
    pol2 = TokenFlowPolicy()
    pol2.decide(snap(*runners, *paused[:3], eng=eng), NOW)  # 80 tok/s
    assert pol2.info.mode == "balance"


def test_admission_paces_a_burst_to_what_the_engine_can_feed() -> None:
    # 100 new requests at once on an engine making ~400 tok/s (8 slots x 1 / 0.02 s); each reader wants
    # 10 tok/s for 200 tokens. Admitted: as many as the engine can feed over every horizon (about 0.9 x 400 /
    # 10 = 36 within the first seconds), not all 100 (every reader would then stall in turn) and not
    # just the 8 that have a slot (the rest would wait for whole answers).
    # With no stall budget: only what the engine can feed stall-free.
    eng = engine(capacity=100_000, seqs=8)
    burst = [sv(f"n{i:03d}", W, started=False, prompt=100, max_tokens=200, arrival=NOW) for i in range(100)]

    def admitted(**knobs: float) -> int:
        ds = TokenFlowPolicy(**knobs).decide(snap(*burst, eng=eng), NOW)
        # Admitted but without a slot this tick, a request is deferred; not admitted, it is held for the working set.
        held = {d.id for d in ds if d.op == "preempt" and d.reason == "working_set"}
        assert held == {f"n{i:03d}" for i in range(100 - len(held), 100)}  # arrival order
        return 100 - len(held)

    stall_free = admitted(stall_budget_s=0.0)
    assert 20 <= stall_free <= 40
    # The default stall budget (3 s of each reader's time) lets more start now, still not all 100.
    assert stall_free < admitted() < 100


def test_the_tick_says_how_many_new_requests_admission_held_and_what_stopped_it() -> None:
    # An operator (and the GPU sittings' logs) must be able to tell why a request waited before its first token:
    # the engine could not feed one more reader, the working set was full, or there was no KV room.
    eng = engine(capacity=100_000, seqs=8)
    burst = [sv(f"n{i:03d}", W, started=False, prompt=100, max_tokens=200, arrival=NOW) for i in range(100)]
    pol = TokenFlowPolicy()
    ds = pol.decide(snap(*burst, eng=eng), NOW)
    held = sum(1 for d in ds if d.op == "preempt" and d.reason == "working_set")
    report = pol.tick_report()
    assert 0 < held == report["held_new"] and report["admit_limit"] == "capacity"
    assert json.loads(json.dumps(report)) == report  # values a JSON log line carries as they are
    # Step 1's count binds first when the device holds few contexts and over-commitment is off.
    pol = TokenFlowPolicy(overcommit=1.0, shrink_rate=1.0)
    pol.decide(snap(*burst, eng=engine(capacity=1_000, seqs=8)), NOW)
    assert pol.tick_report()["admit_limit"] == "working_set" and pol.tick_report()["held_new"] > 0
    # A small host tier: the contexts the newcomers will grow to (prompt plus answer) no longer fit device plus host.
    small = EngineView("e", 16, 8, 1024, 1_000, 0, 1_000, 0, 0.02, 1000.0, 10_000.0, 1e9, 1e9)
    pol = TokenFlowPolicy()
    pol.decide(snap(*burst, eng=small), NOW)
    assert pol.tick_report()["admit_limit"] == "kv" and pol.tick_report()["held_new"] > 90
    # Deep enough an engine, admission keeps no one out; those past the batch's 8 slots wait for the device.
    pol = TokenFlowPolicy()
    pol.decide(snap(*burst[:10], eng=eng), NOW)
    assert pol.tick_report()["held_new"] == 0 and pol.tick_report()["admit_limit"] == ""
    assert pol.tick_report()["deferred_new"] == 2


def test_prefill_steps_do_not_read_as_lost_decode_capacity() -> None:
    # Mid-burst: 8 readers started, 60 new requests wait. The engine's recent steps average 0.2 s because
    # they computed the burst's prompts; its decode-only steps take 0.02 s. Admission must count the latter
    # (the prompts' cost is charged per newcomer already): else admitting a burst slows the steps, which
    # stops admission, which leaves the tail of the burst waiting (found on the H200).
    started = [sv(f"s{i}", R, buf=5.0, prompt=100, gen=10, max_tokens=200) for i in range(8)]
    burst = [sv(f"n{i:03d}", W, started=False, prompt=100, max_tokens=200) for i in range(60)]

    def admitted(step: float, decode_step: float | None) -> int:
        eng = EngineView("e", 16, 8, 1024, 100_000, 0, 1_000_000, 0, step, 1000.0, 10_000.0, 1e9, 1e9, decode_step)
        ds = TokenFlowPolicy().decide(snap(*started, *burst, eng=eng), NOW)
        return 60 - sum(1 for d in ds if d.op == "preempt" and d.reason == "working_set")

    decode_paced = admitted(0.02, None)
    assert 0 < decode_paced < 60
    assert admitted(0.2, 0.02) == decode_paced
    assert admitted(0.2, None) < decode_paced  # an engine that reports no decode-only steps: the mean it gives


def test_chosen_requests_fit_the_device_in_whole_blocks() -> None:
    # KV headroom: what the policy lets run (contexts rounded up to 16-token blocks, plus a tick of growth)
    # fits memory_target of the device, so the engine never has to preempt by recomputation on its own.
    # Every buffer is empty (overload): runners that do not fit are paused by the policy itself.
    eng = engine(capacity=3000, seqs=64)
    streams = [sv(f"r{i}", R, buf=0.0, prompt=300, gen=1 + i, max_tokens=2000) for i in range(12)]
    ds = TokenFlowPolicy().decide(snap(*streams, sv("new", W, started=False), eng=eng), NOW)
    kept = [s for s in streams if s.id not in ops(ds).get("preempt", set())]
    step_growth = int(TICK / 0.02) + 1
    blocks = sum(-(-(s.context_tokens + step_growth) // 16) * 16 for s in kept)
    assert blocks <= 0.92 * 3000
    assert len(kept) < 12


def test_admission_respects_the_host_tier() -> None:
    # Device 2,000 tokens, host 2,000: two admitted requests of ~1,100 tokens plus their growth take most
    # of it; a new request whose prompt + output (3,000) cannot be held anywhere stays out of the engine.
    eng = EngineView("e", 16, 64, 1024, 2000, 0, 2000, 0, 0.02, 1000.0, 10_000.0, 1e9, 1e9)
    big = sv("big", W, started=False, prompt=1000, max_tokens=2000, arrival=NOW - 10)
    s = snap(sv("a", R, buf=500.0), sv("b", H, buf=500.0), big, eng=eng)
    assert "big" in ops(TokenFlowPolicy().decide(s, NOW)).get("preempt", set())
    small = sv("small", W, started=False, prompt=100, max_tokens=200, arrival=NOW - 10)
    s2 = snap(sv("a", R, buf=500.0), sv("b", H, buf=500.0), small, eng=eng)
    assert "small" not in ops(TokenFlowPolicy().decide(s2, NOW)).get("preempt", set())


def test_a_runner_the_host_cannot_take_is_priced_at_recompute() -> None:
    # Host tier full: pausing a runner means recomputing its 1,100 tokens (0.11 s at 10k tok/s, x mu), so
    # with 1.2 s of buffer it is no longer safe to pause; with host room it is.
    full = EngineView("e", 16, 2, 1024, 100_000, 0, 10_000, 10_000, 0.02, 1000.0, 10_000.0, 1e9, 1e9)
    room = EngineView("e", 16, 2, 1024, 100_000, 0, 10_000, 0, 0.02, 1000.0, 10_000.0, 1e9, 1e9)
    runners = (sv("a", R, buf=5.0, host=0), sv("b", R, buf=12.0, host=0))
    assert "b" in ops(TokenFlowPolicy().decide(snap(*runners, sv("p", H, buf=0.0), eng=room), NOW))["preempt"]
    assert "b" not in ops(TokenFlowPolicy().decide(snap(*runners, sv("p", H, buf=0.0), eng=full), NOW)).get(
        "preempt", set())


def test_deterministic() -> None:
    streams = [sv(f"s{i}", [R, H, W][i % 3], buf=float(i * 7 % 90), started=i % 3 != 2, arrival=float(i))
               for i in range(60)]
    s = snap(*streams, eng=engine(capacity=20_000, seqs=16))
    assert TokenFlowPolicy().decide(s, NOW) == TokenFlowPolicy().decide(s, NOW)


def test_a_stalled_client_is_paused_without_stress_and_not_resumed() -> None:
    stalled = StreamView("gone", R, 50.0, 10.0, 1000, 100, 30.0, 60.0, 2000, 1100, 1100, stalled=True)
    # Everyone runs and memory is plentiful: only the stalled reader is paused.
    o = ops(TokenFlowPolicy().decide(snap(sv("a", R, buf=5.0), stalled), NOW))
    assert o == {"preempt": {"gone"}}
    # Paused and still stalled: never resumed to fill free room, even with an empty buffer.
    held = StreamView("gone", H, 50.0, 10.0, 1000, 100, 0.0, 60.0, 2000, 0, 1100, stalled=True)
    o = ops(TokenFlowPolicy().decide(snap(sv("a", R, buf=5.0), held, sv("b", W, started=False)), NOW))
    assert "gone" not in o.get("resume", set()) and "gone" not in o.get("prefetch", set())
    # Reading again: an ordinary paused request with an empty buffer, resumed.
    back = StreamView("gone", H, 50.0, 10.0, 1000, 100, 0.0, 60.0, 2000, 0, 1100)
    o = ops(TokenFlowPolicy().decide(snap(sv("a", R, buf=5.0), back), NOW))
    assert "gone" in o.get("resume", set()) | o.get("prefetch", set())


def test_parked_requests_never_starve_the_chosen_ones_of_device_memory() -> None:
    # The state a small vLLM KV cache reached: every buffer empty, 13 parked requests holding almost all
    # device blocks, 8 resumed requests waiting for blocks, 11 loading with none, 8 batch slots. The
    # chosen requests must get the memory: enough parked ones are unparked (preempted back to the host).
    eng = engine(capacity=4064, seqs=8)
    parked = [sv(f"p{i}", P, prompt=200, gen=100, max_tokens=400) for i in range(13)]
    waiting = [sv(f"w{i}", W, prompt=200, gen=100, max_tokens=400) for i in range(8)]
    loading = [sv(f"l{i}", L, prompt=200, gen=100, max_tokens=400) for i in range(11)]
    streams = (*parked, *waiting, *loading)
    o = ops(TokenFlowPolicy().decide(snap(*streams, eng=eng), NOW))
    unparked = {d for d in o.get("preempt", set()) if d.startswith("p")}
    kept = 13 - len(unparked)
    # What stays parked plus the 8 that will run fits the device.
    assert (kept + 8) * 300 <= 4064
    assert unparked


def test_two_empty_streams_are_not_swapped_every_tick() -> None:
    # One slot, overload: the runner and a paused request both have empty buffers. The paused one has no host
    # copy, so its slack is lower by its recomputation alone (1,100 tokens at 1,000 tok/s, x mu = 2.2 s).
    # Swapping them helps neither reader and costs a switch each tick: the runner keeps the slot until it
    # holds swap_tolerance_s (2 s) more than the paused one.
    eng = EngineView("e", 16, 1, 1024, 100_000, 0, 1_000_000, 0, 0.02, 1000.0, 1000.0, 1e9, 1e9)
    paused = sv("p", H, buf=0.0, host=0)
    empty = ops(TokenFlowPolicy().decide(snap(sv("r", R, buf=0.0), paused, eng=eng), NOW))
    assert "r" not in empty.get("preempt", set()) and "p" not in empty.get("resume", set())
    ahead = ops(TokenFlowPolicy().decide(snap(sv("r", R, buf=25.0), paused, eng=eng), NOW))  # 2.5 s of buffer
    assert "r" in ahead["preempt"] and "p" in ahead["resume"]


def test_decisions_match_the_recording_on_random_snapshots() -> None:
    """Every decision and the tick's info, on seeded random snapshots (every status, stalled clients, host tier
    or not, overload or not, odd knobs), equal what the policy decided when the recording was made: the
    implementation may get faster, never different (tests/unit/tokenflow_cases.py says how to re-record)."""
    recorded = json.loads(RECORDING.read_text())
    assert len(recorded) == SEQUENCES + BURSTS
    for (seq, knobs, ticks), want in zip(runs(), recorded, strict=True):
        policy = TokenFlowPolicy(**knobs)
        for t, ((now, snapshot), w) in enumerate(zip(ticks, want, strict=True)):
            assert outcome(policy, snapshot, now) == w, f"sequence {seq}, tick {t}"


def test_the_random_snapshots_cover_every_case() -> None:
    statuses, modes, reasons = set(), set(), set()
    stalled = host_tier = no_host_tier = no_max_tokens = prefilling = 0
    for _, _, ticks in runs():
        for _, s in ticks:
            statuses |= {v.status for v in s.streams}
            stalled += any(v.stalled for v in s.streams)
            no_max_tokens += any(v.max_tokens is None for v in s.streams)
            prefilling += any(v.status is EngineStatus.RUNNING and v.first_token_time is None for v in s.streams)
            host_tier += s.engine.kv_host_capacity_tokens > 0
            no_host_tier += s.engine.kv_host_capacity_tokens == 0
    for seq in json.loads(RECORDING.read_text()):
        for t in seq:
            modes.add(t["info"][0])
            reasons |= {tuple(r.split(":")) for r in t["reasons"]}
    assert statuses == set(EngineStatus)
    assert modes == {"idle", "balance", "overload"}
    assert min(stalled, host_tier, no_host_tier, no_max_tokens, prefilling) >= 20
    assert {("preempt", r) for r in ("buffered", "overload", "defer", "working_set", "stalled", "unpark")} <= reasons
    assert {("resume", r) for r in ("fill", "urgent", "recompute", "run_after_load")} <= reasons
    assert {("prefetch", "prefetch"), ("prefetch", "reload")} <= reasons
    assert {("priority", "admit"), ("priority", "victim_order")} <= reasons


def test_decisions_on_the_tick_cost_benchmark_snapshots_are_unchanged() -> None:
    """The snapshots `tokenflow bench tick-cost` times (1,000 streams, cold and steady): a digest of the decisions
    recorded with the recording above, so that a faster tick is the same tick."""
    cold = stressed_snapshot(1000)
    policy = TokenFlowPolicy(first_token_grace_s=4.0)  # the default when the digest was recorded
    first = outcome(policy, cold, 99.5)
    steady = apply(cold, policy.decide(cold, 99.5), 0.5)
    digest = hashlib.sha256(json.dumps([first, outcome(policy, steady, 100.0)]).encode()).hexdigest()
    assert digest == BENCH_DIGEST
