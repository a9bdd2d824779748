"""Drive the TokenFlow scheduler subclasses directly, with async scheduling's overlapping steps, on any build.

vLLM's CPU build forces synchronous scheduling, so the engine tests never run ``TokenFlowAsyncScheduler``
the way the CUDA build does (step N+1 scheduled while step N runs; commands applied between them). This
script builds the real scheduler class from a real ``VllmConfig`` (the tiny local model, no weights loaded)
and plays the engine core's batch queue with a stand-in model: each sampled token is a fixed function of
its position, so a request that is preempted, resumed and prefetched at arbitrary step boundaries must
end with exactly the tokens of an uninterrupted run; any position computed twice or skipped shows.

Run with the vLLM venv's python (tests/vllm/test_scheduler_async.py does):

    python tests/vllm/scheduler_harness.py MODEL_DIR [--seeds 1,2,3]

Host KV is played by ``HostTier``, a connector whose worker side is the stand-in engine: it "stores" every full
block a request computes and "loads" a re-admitted request's stored blocks asynchronously (the load lands with the
step after it starts), so preempt / prefetch / resume take the same paths as with vLLM's offloading connector.

Runs each seed with async scheduling (a batch queue of two steps) and with synchronous scheduling, each with
the device prefix cache on and off. Prints
one JSON line per run (the commands sent, the statuses they produced, the plugin's counters), and exits
non-zero with a JSON line naming the violation at the first one.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backends" / "vllm"))

import torch
from tokenflow_vllm.scheduler import Phase, TokenFlowAsyncScheduler, TokenFlowScheduler
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK = 16
VOCAB = 1000


def token_at(prompt_seed: int, position: int) -> int:
    """The stand-in model: the token sampled at absolute position ``position`` of a request."""
    return 4 + (prompt_seed * 7919 + position * 104729) % VOCAB


class HostTierMeta(KVConnectorMetadata):
    def __init__(self, loads: set[str]) -> None:
        self.loads = loads


class HostTier(KVConnectorBase_V1):
    """A host KV tier for the stand-in model (scheduler side; ``Engine`` plays the worker): the KV's content does
    not matter there, only how many leading tokens of each request the tier holds, in whole blocks."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.stored: dict[str, int] = {}  # request id -> leading tokens on the host
        self.loading: set[str] = set()  # loads started since the last step's metadata
        self.loads = 0  # started, in all

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        # like a prefix hit, short of the last known token (vLLM computes at least one)
        hit = min(self.stored.get(request.request_id, 0), (request.num_tokens - 1) // BLOCK * BLOCK)
        return (hit - num_computed_tokens, True) if hit > num_computed_tokens else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens:
            self.loading.add(request.request_id)
            self.loads += 1

    def build_connector_meta(self, scheduler_output: Any) -> HostTierMeta:
        # written through: what this step computes, in full blocks (num_computed_tokens is advanced afterwards,
        # so count the scheduled tokens too)
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            req = self._requests[rid]
            full = (req.num_computed_tokens + n) // BLOCK * BLOCK
            if full > self.stored.get(rid, 0):
                self.stored[rid] = full
        meta, self.loading = HostTierMeta(self.loading), set()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        self.stored.pop(request.request_id, None)
        return False, None

    # the worker side is Engine's
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None: ...
    def wait_for_layer_load(self, layer_name: str) -> None: ...
    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None: ...
    def wait_for_save(self) -> None: ...


HOST_TIER = json.dumps({"kv_connector": "HostTier", "kv_role": "kv_both",
                        "kv_connector_module_path": "scheduler_harness"})


def make_scheduler(model: str, async_: bool, num_blocks: int, max_num_seqs: int, *, cls: Any = None,
                   policy: str = "priority", max_num_batched_tokens: int = 256, kv_transfer: str | None = None,
                   prefix_caching: bool = True):
    """A scheduler over a KV pool of ``num_blocks`` (no model, no device): the TokenFlow subclass unless ``cls``
    (e.g. vLLM's own, to compare); ``kv_transfer``: a ``--kv-transfer-config`` JSON (its scheduler side only)."""
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=model, dtype="float32", max_model_len=2048, skip_tokenizer_init=True),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,  # 256: prompt chunks, prefills span several steps
            max_model_len=2048,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
            policy=policy,
        ),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching),
        kv_transfer_config=KVTransferConfig(**json.loads(kv_transfer)) if kv_transfer else None,
    )
    cls = cls or (TokenFlowAsyncScheduler if async_ else TokenFlowScheduler)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=_tensors(spec.page_size_bytes * num_blocks),
        kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)],
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    sched = cls(
        vllm_config=vllm_config,
        kv_cache_config=kv,
        log_stats=False,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )
    if type(sched.connector).__name__ == "HostTier":  # (loaded by vLLM from the module, not this script)
        sched.connector._requests = sched.requests
    return sched


def _tensors(size: int) -> list[Any]:
    """The KV tensor a worker would allocate: the offloading connector sizes its host tier per device block from it
    (0.26 reads only the tensors; 0.32 changed the tensor's fields and falls back to the groups' specs)."""
    try:
        return [KVCacheTensor(size=size, shared_by=["layer"])]
    except TypeError:
        return []


class Engine:
    """The engine core's loop with a batch queue of ``depth`` steps (2 = async scheduling)."""

    def __init__(self, sched: Any, depth: int) -> None:
        self.sched, self.depth = sched, depth
        self.queue: deque = deque()
        self.outputs: dict[str, list[int]] = {}
        self.seeds: dict[str, int] = {}
        self.finished: set[str] = set()
        self.decode_resumes = 0  # requests taken back after a preemption with one token left to compute
        # Requests the model runner holds state for: vLLM's V2 runner (the CUDA default) has max_num_seqs slots,
        # taken by a new or resumed request, freed when the scheduler reports it finished or preempted.
        self.runner_slots: set[str] = set()

    def add(self, rid: str, prompt_len: int, max_tokens: int, seed: int,
            kv_transfer_params: dict[str, Any] | None = None) -> None:
        hasher = get_request_block_hasher(BLOCK, sha256)
        prompt = [token_at(seed, p) for p in range(prompt_len)]
        xargs: dict[str, Any] = {"tokenflow_id": rid}
        if kv_transfer_params is not None:  # (where vLLM's API server puts a request's kv_transfer_params)
            xargs["kv_transfer_params"] = kv_transfer_params
        req = Request(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=xargs),
            pooling_params=None,
            block_hasher=hasher,
        )
        self.seeds[rid] = seed
        self.outputs[rid] = []
        self.sched.add_request(req)

    def step(self) -> None:
        """One iteration of EngineCore.step_with_batch_queue (or step, at depth 1)."""
        sched = self.sched
        if sched.has_requests():
            out = sched.schedule()
            resumed = out.scheduled_cached_reqs.resumed_req_ids
            self.decode_resumes += sum(out.num_scheduled_tokens[r] == 1 for r in resumed)
            slots = self.runner_slots
            slots.difference_update(out.finished_req_ids, out.preempted_req_ids or ())
            slots.update(r.req_id for r in out.scheduled_new_reqs)
            slots.update(resumed)
            check(len(slots) <= sched.max_num_running_reqs,
                  f"the model runner would hold {len(slots)} requests, more than max_num_seqs")
            # What the model computes: each request that is not mid-prompt samples the token at the position
            # after everything scheduled so far (placeholders included).
            samples = {}
            for rid in out.num_scheduled_tokens:
                req = sched.requests[rid]
                if not req.is_prefill_chunk:
                    samples[rid] = token_at(self.seeds[rid], req.num_computed_tokens)
            self.queue.appendleft((out, samples))
            if len(self.queue) < self.depth and (out.total_num_scheduled_tokens > 0 or sched.has_requests()):
                return
        if not self.queue:
            return
        out, samples = self.queue.pop()
        rids = list(out.num_scheduled_tokens)
        meta = out.kv_connector_metadata
        mro = ModelRunnerOutput(
            req_ids=rids,
            req_id_to_index={r: i for i, r in enumerate(rids)},
            sampled_token_ids=[[samples[r]] if r in samples else [] for r in rids],
            kv_connector_output=connector_output(meta),
        )
        for outs in sched.update_from_output(out, mro).values():
            for o in outs.outputs:
                self.outputs[o.request_id].extend(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finished.add(o.request_id)

    def control(self, *commands: dict) -> list[dict]:
        return json.loads(self.sched.tokenflow_call(json.dumps({"kind": "commands", "commands": list(commands)})))[
            "results"
        ]

    def state(self) -> dict:
        return json.loads(self.sched.tokenflow_call(json.dumps({"kind": "state"})))


def connector_output(meta: Any) -> KVConnectorOutput | None:
    """What the worker side reports with a step's output: every transfer the step's connector metadata started has
    landed (the host tier's loads; the offloading connector's stores and loads, so that its scheduler side
    completes them as on a GPU, where a store of a few blocks takes well under a step)."""
    kind = type(meta).__name__
    if kind == "HostTierMeta" and meta.loads:
        return KVConnectorOutput(finished_recving=meta.loads)
    if kind == "OffloadingConnectorMetadata" and (meta.store_jobs or meta.load_jobs):
        done = OffloadingWorkerMetadata(completed_jobs=dict.fromkeys((*meta.store_jobs, *meta.load_jobs), 1))
        loaded = {job.req_id for job in meta.load_jobs.values()}
        return KVConnectorOutput(finished_recving=loaded or None, kv_connector_worker_meta=done)
    return None


def check(cond: bool, what: str) -> None:
    if not cond:
        print(json.dumps({"ok": False, "failed": what}))
        sys.exit(1)


def run(model: str, async_: bool, seed: int, prefix_caching: bool) -> dict[str, Any]:
    init_none_hash(sha256)
    rng = random.Random(seed)
    # Few blocks, so the engine's own preemption (KV exhausted) mixes with the gateway's commands. Without prefix
    # caching every re-admission loads from the host tier or recomputes; with it, most find their blocks still on
    # the device.
    sched = make_scheduler(model, async_, num_blocks=160, max_num_seqs=6, kv_transfer=HOST_TIER,
                           prefix_caching=prefix_caching)
    eng = Engine(sched, depth=2 if async_ else 1)
    n_req = 12
    want = {}
    for i in range(n_req):
        rid = f"r{i}"
        plen, mt = rng.randint(20, 300), rng.randint(30, 160)
        eng.add(rid, plen, mt, seed=i + 1)
        want[rid] = [token_at(i + 1, plen + k) for k in range(mt)]
    ops = ("preempt", "resume", "prefetch", "priority")
    n_cmds = 0
    ready_parked = 0  # parked requests seen with their KV loaded
    statuses: dict[str, int] = {}
    for step in range(20000):
        if len(eng.finished) == n_req:
            break
        eng.step()
        if step % 3 == 0:
            # A batch of random commands between steps, as the gateway's control loop sends them.
            live = [r for r in want if r not in eng.finished]
            batch = []
            for _ in range(rng.randint(0, 4)):
                op = rng.choice(ops)
                cmd = {"op": op, "id": rng.choice(live)} if live else None
                if cmd and op == "priority":
                    cmd["priority"] = rng.randint(-2, 2)
                if cmd:
                    batch.append(cmd)
            # Resume everything now and then, so no request stays held for good.
            if step % 60 == 0:
                batch += [{"op": "resume", "id": r} for r in live]
            for res in eng.control(*batch):
                check(res["ok"], f"command failed: {res}")
                statuses[res["status"]] = statuses.get(res["status"], 0) + 1
                n_cmds += 1
            # The scheduler's indexes agree with its requests (they stand in for per-step scans).
            phases = Counter(t.phase for t in sched._tf.values())
            check(+sched._tf_in_phase == +phases, f"phase counts {dict(sched._tf_in_phase)} != {dict(phases)}")
            check(all(t.phase is not Phase.REQUEUE or rid in sched._tf_boundary for rid, t in sched._tf.items()),
                  "a requeued request missing from the step-boundary index")
            st = eng.state()
            e = st["engine"]
            check(e["kv_device_used_tokens"] <= e["kv_device_capacity_tokens"], "device KV over capacity")
            for r in st["requests"]:
                if r["status"] == "held":
                    check(r["kv_device_tokens"] == 0 and r["computed_tokens"] == 0, f"held request with KV: {r}")
                if r["status"] == "parked" and r["computed_tokens"] and not prefix_caching:
                    # KV on the device again (loaded: no prefix cache to claim from), up to its last token, so
                    # that resume is one decode step
                    check(r["computed_tokens"] == r["prompt_tokens"] + r["output_tokens"] - 1,
                          f"parked request not ready to decode: {r}")
                    ready_parked += 1
    check(len(eng.finished) == n_req, f"only {len(eng.finished)} of {n_req} finished")
    for rid, toks in want.items():
        got = eng.outputs[rid]
        first = next((i for i, (a, b) in enumerate(zip(got, toks)) if a != b), min(len(toks), len(got)))
        check(got == toks, f"{rid}: output differs from an uninterrupted run "
              f"(got {len(got)} tokens, want {len(toks)}; first difference at {first})")
    # Nothing left behind: every block back in the pool, no tracked request, no queued one.
    eng.step()
    pool = sched.kv_cache_manager.block_pool
    check(pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, "device blocks leaked")
    check(not sched._tf and not sched.requests, "requests left in the scheduler")
    c = eng.state()["engine"]["counters"]
    return {"ok": True, "async": async_, "prefix_caching": prefix_caching, "seed": seed, "commands": n_cmds,
            "statuses": statuses, "counters": c,
            "host_loads": sched.connector.loads, "decode_resumes": eng.decode_resumes,
            "ready_parked": ready_parked, "steps": step}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seeds", default="1,2,3")
    a = ap.parse_args()
    for seed in (int(x) for x in a.seeds.split(",")):
        for async_ in (True, False):
            for prefix_caching in (True, False):
                print(json.dumps(run(a.model, async_, seed, prefix_caching)), flush=True)


if __name__ == "__main__":
    main()
