"""Calibrate the simulated engine's step-time model against a real CUDA GPU.

The simulated engine prices one step as (backends/sim/profile.py, ``step_seconds``)

    t_step = max(base_s + per_token_s * scheduled_tokens, compute_per_token_s * scheduled_tokens)
             + per_kv_token_s * attended_kv_tokens

(scheduled_tokens: decode plus prefill tokens in the step; attended_kv_tokens: the summed context lengths of the
decoding requests; compute_per_token_s = 0 is the linear form). ``measure`` times a Llama3-8B-shaped model
(random bf16 weights built on the GPU; nothing is downloaded) on the card it runs on, and writes the raw numbers
as JSON:

- the two ceilings: device copy bandwidth (HBM) and bf16 matrix-product rate;
- prefill time against prompt length, and decode step time against batch size and context length, each as an
  eager forward and as a CUDA-graph replay of the same forward (cuBLAS GEMMs; FlashAttention or the fastest
  other scaled_dot_product_attention kernel for the shape; a contiguous KV cache);
- the roofline time of each point (weights and KV read once per step, FLOPs at the measured matmul rate);
- device KV capacity the way vLLM sizes it (gpu-memory-utilization x total - weights - activation peak - other);
- KV block copy bandwidth device -> pinned host -> device, alone and while a decode step (or a prefill) runs on
  the main stream.

``fit`` (CPU only; numpy and PyYAML) fits the four coefficients (minimax on relative error over every measured
step) and writes a profile in the simulated engine's YAML format, with the best linear fit kept for reference.
Run from the repository root:

    python3 -m backends.sim.calibrate measure --out h100.json            # on the GPU machine, torch only
    python3 -m backends.sim.calibrate fit h100.json --profile configs/profiles/h100-llama3-8b.yaml

``fit-trace`` fits the same form to a real engine's steps instead: the step trace the vLLM plugin writes with
``TOKENFLOW_STEP_TRACE`` (one line per engine step: its duration, decoding requests, their summed context,
prompt tokens), restricted to the time windows of chosen benchmark runs, and takes the device and host KV sizes,
block size and batch limits from the engine's state report; the copy bandwidths are the plugin's measurements.
When the trace has 16 or more full prefill chunks, the compute line is their median price (the least-squares
fit follows the many decode steps and underprices them). The summary gives the steps' time beyond the model per
engine preemption of the runs (the profile's ``engine.preempt_s``), or, with ``--simulated-preemptions N``, per
preemption the simulator makes for the same run (it preempts about twice as often as vLLM; spread over its own
count the simulated run spends the real one's time beyond the model); an ``engine:`` section already in the output
profile is kept, with that price written into it (docs/sim-cost-model.md, "Engine preemption modes" and "Against
the sixth sitting").
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .profile import step_seconds

# ------------------------------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    name: str = "llama3-8b"
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0
    max_model_len: int = 8192

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2  # K and V, bf16

    @property
    def layer_matmul_params(self) -> int:
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        return qkv + self.heads * self.head_dim * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def weight_read_bytes(self) -> int:
        """Bytes a step must read: every matmul weight and the LM head (the embedding is only gathered)."""
        return 2 * (self.layers * self.layer_matmul_params + self.vocab * self.hidden)

    @property
    def total_weight_bytes(self) -> int:
        return self.weight_read_bytes + 2 * (self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden)


LLAMA3_8B = ModelShape()
TINY = ModelShape(name="tiny", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=512,
                  vocab=1000, max_model_len=1024)


def step_cost(shape: ModelShape, segments: list[tuple[str, int, int]]) -> dict[str, float]:
    """Fewest bytes and FLOPs of one step over (kind, n, length) segments: ("decode", batch, context) or
    ("prefill", prompts, prompt length). Weights are read once per step, KV once per decoding request."""
    kvb = shape.kv_bytes_per_token
    attn_per_pair = 4 * shape.heads * shape.head_dim * shape.layers  # QK^T and PV, 2 FLOPs per multiply-add
    nbytes, flops = float(shape.weight_read_bytes), 0.0
    for kind, n, length in segments:
        if kind == "decode":
            tokens, kv_read, pairs = n, n * (length + 1), n * (length + 1)
        else:
            tokens, kv_read, pairs = n * length, 0, n * length * (length + 1) // 2
        flops += 2 * shape.layers * shape.layer_matmul_params * tokens + 2 * shape.vocab * shape.hidden * n
        flops += attn_per_pair * pairs
        nbytes += (kv_read + tokens) * kvb
    return {"bytes": nbytes, "flops": flops}


def roofline_s(cost: dict[str, float], hbm_bytes_per_s: float, flops_per_s: float) -> float:
    return max(cost["bytes"] / hbm_bytes_per_s, cost["flops"] / flops_per_s)


# ----------------------------------------------------------------------------------------- the model (torch)


@dataclass
class Segment:
    """A part of one step's batch: `n` decodes at context `length`, or `n` prefills of `length` tokens."""

    kind: str  # "decode" or "prefill"
    n: int
    length: int
    kc: list[Any]  # per-layer K cache [n, kv_heads, cap, head_dim]
    vc: list[Any]
    backend: Any = None  # a list of SDPBackend, or None for torch's own choice

    @property
    def rows(self) -> int:
        return self.n if self.kind == "decode" else self.n * self.length


def _rms_plain(F: Any, x: Any, w: Any) -> Any:
    return F.rms_norm(x, (x.shape[-1],), w, eps=1e-5)


class RandomLlama:
    """Llama3-shaped decoder with random bf16 weights over a contiguous KV cache.

    One forward runs a list of segments (decodes, prefills, or both: a mixed chunked-prefill step) through
    shared GEMMs, as an engine does. With ``fused`` the pointwise work is fused the way vLLM's kernels fuse it
    (residual add + RMSNorm, rotary on q and k together, SiLU x mul), through torch.compile; otherwise it is
    plain PyTorch ops.
    """

    def __init__(self, torch: Any, shape: ModelShape, device: str, seed: int = 0) -> None:
        self.torch, self.shape, self.device = torch, shape, device
        F = self.F = torch.nn.functional
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        bf16 = torch.bfloat16

        def weight(out_f: int, in_f: int) -> Any:
            w = torch.randn(out_f, in_f, device=device, dtype=bf16, generator=gen)
            return w.mul_(in_f**-0.5)  # keeps activations O(1) through 32 layers, no inf/NaN

        s = shape
        qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim
        ones = lambda: torch.ones(s.hidden, device=device, dtype=bf16)  # noqa: E731
        self.layers = [
            {"wqkv": weight(qkv_out, s.hidden), "wo": weight(s.hidden, s.heads * s.head_dim),
             "wgu": weight(2 * s.intermediate, s.hidden), "wd": weight(s.hidden, s.intermediate),
             "ln1": ones(), "ln2": ones()}
            for _ in range(s.layers)
        ]
        self.embed = torch.randn(s.vocab, s.hidden, device=device, dtype=bf16, generator=gen)
        self.lm_head = weight(s.vocab, s.hidden)
        self.norm = ones()
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim))
        freqs = torch.outer(torch.arange(s.max_model_len + 64, device=device, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(bf16), emb.sin().to(bf16)

        def add_rms(x: Any, residual: Any, w: Any) -> tuple[Any, Any]:
            y = x + residual
            return _rms_plain(F, y, w), y

        def rope_qk(q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
            def rot(t: Any) -> Any:
                half = t.shape[-1] // 2
                return torch.cat([-t[..., half:], t[..., :half]], dim=-1)

            return q * cos + rot(q) * sin, k * cos + rot(k) * sin

        def silu_mul(gu: Any) -> Any:
            g, u = gu.chunk(2, dim=-1)
            return F.silu(g) * u

        self.plain: dict[str, Callable[..., Any]] = {"add_rms": add_rms, "rope_qk": rope_qk, "silu_mul": silu_mul}
        self.ops = dict(self.plain)
        self.fused = False
        self.fuse_error: str | None = None

    def enable_fusion(self) -> bool:
        """Compile the pointwise ops (one kernel each); falls back to plain ops if compilation fails."""
        torch = self.torch
        try:
            compiled = {k: torch.compile(f, dynamic=True, fullgraph=True) for k, f in self.plain.items()}
            x = torch.randn(3, self.shape.hidden, device=self.device, dtype=torch.bfloat16)
            compiled["add_rms"](x, x, self.norm)
            self.compiled = compiled
            return True
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: measure without fusion
            self.fuse_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            return False

    def set_fused(self, on: bool) -> None:
        self.fused = on and hasattr(self, "compiled")
        self.ops = self.compiled if self.fused else self.plain

    def _sdpa(self, q: Any, k: Any, v: Any, causal: bool, backend: Any) -> Any:
        if backend is None:
            return self.F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return self.F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def _attention(self, qkv: Any, segs: list[Segment], layer: int) -> Any:
        s, ops = self.shape, self.ops
        H, KVH, D = s.heads, s.kv_heads, s.head_dim
        outs, row = [], 0
        for seg in segs:
            part = qkv[row : row + seg.rows]
            row += seg.rows
            q, k, v = part.split([H * D, KVH * D, KVH * D], dim=-1)
            kc, vc = seg.kc[layer], seg.vc[layer]
            if seg.kind == "decode":
                B, pos = seg.n, seg.length
                q, k = ops["rope_qk"](q.view(B, H, D), k.view(B, KVH, D), self.cos[pos], self.sin[pos])
                kc[:, :, pos] = k
                vc[:, :, pos] = v.view(B, KVH, D)
                # Grouped-query decode as a (H/KVH)-row query per KV head: each KV head's cache is read once.
                o = self._sdpa(q.view(B, KVH, H // KVH, D), kc[:, :, : pos + 1], vc[:, :, : pos + 1], False,
                               seg.backend)
                outs.append(o.reshape(B, H * D))
            else:
                n, L = seg.n, seg.length
                cos, sin = self.cos[:L].view(1, L, 1, D), self.sin[:L].view(1, L, 1, D)
                q, k = ops["rope_qk"](q.view(n, L, H, D), k.view(n, L, KVH, D), cos, sin)
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(n, L, KVH, D).transpose(1, 2)
                kc[:, :, :L] = k
                vc[:, :, :L] = v
                # KV heads expanded to query heads (query head h reads KV head h // group), as repeat_kv does.
                g = H // KVH
                ke = k[:, :, None].expand(n, KVH, g, L, D).reshape(n, H, L, D)
                ve = v[:, :, None].expand(n, KVH, g, L, D).reshape(n, H, L, D)
                o = self._sdpa(q, ke, ve, True, seg.backend)
                outs.append(o.transpose(1, 2).reshape(n * L, H * D))
        return outs[0] if len(outs) == 1 else self.torch.cat(outs)

    def forward(self, tokens: Any, segs: list[Segment], logits: bool = False) -> Any:
        """One engine step over `segs` (tokens: all segments' tokens, flat); returns each sequence's next token."""
        F, ops = self.F, self.ops
        x = F.embedding(tokens, self.embed)
        residual = None
        for i, p in enumerate(self.layers):
            if residual is None:
                h, residual = _rms_plain(F, x, p["ln1"]), x
            else:
                h, residual = ops["add_rms"](x, residual, p["ln1"])
            x = F.linear(self._attention(F.linear(h, p["wqkv"]), segs, i), p["wo"])
            h, residual = ops["add_rms"](x, residual, p["ln2"])
            x = F.linear(ops["silu_mul"](F.linear(h, p["wgu"])), p["wd"])
        h, _ = ops["add_rms"](x, residual, self.norm)
        rows, row = [], 0  # logits for every decode row and the last row of every prefill
        for seg in segs:
            part = h[row : row + seg.rows]
            rows.append(part if seg.kind == "decode" else part.view(seg.n, seg.length, -1)[:, -1])
            row += seg.rows
        out = F.linear(rows[0] if len(rows) == 1 else self.torch.cat(rows), self.lm_head)
        return out if logits else out.argmax(-1)


def kv_views(pool: Any, shape: ModelShape, batch: int, cap: int, offset_tokens: int = 0) -> tuple[list[Any], list[Any]]:
    """Per-layer K and V caches [batch, kv_heads, cap, head_dim] carved from one flat bf16 pool."""
    per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim
    start, need = per_token * offset_tokens, per_token * batch * cap
    if start + need > pool.numel():
        raise ValueError(f"KV pool too small for batch {batch} x {cap} tokens at offset {offset_tokens}")
    v = pool[start : start + need].view(shape.layers, 2, batch, shape.kv_heads, cap, shape.head_dim)
    return [v[i, 0] for i in range(shape.layers)], [v[i, 1] for i in range(shape.layers)]


# ----------------------------------------------------------------------------------------------------- timing


class Clock:
    """Times callables with CUDA events (median of many runs), or with the host clock on the CPU."""

    def __init__(self, torch: Any, cuda: bool) -> None:
        self.torch, self.cuda = torch, cuda

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], warmup: int, iters: int) -> dict[str, float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times: list[float] = []
        if self.cuda:
            ev = self.torch.cuda.Event
            pairs = [(ev(enable_timing=True), ev(enable_timing=True)) for _ in range(iters)]
            for start, end in pairs:
                start.record()
                fn()
                end.record()
            self.sync()
            times = [start.elapsed_time(end) / 1e3 for start, end in pairs]
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": iters}


def capture_graph(torch: Any, fn: Callable[[], Any]) -> Any:
    """Capture `fn` into a CUDA graph after a warm-up on a side stream (as torch's documentation does)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def pick_attention(torch: Any, clock: Clock, model: RandomLlama, seg: Segment,
                   cuda: bool) -> tuple[Any, dict[str, float | None]]:
    """Time each scaled_dot_product_attention backend on this segment's attention for all layers, replayed as a
    CUDA graph (eager timing would measure launch overhead); return the fastest backend and every time."""
    if not cuda:
        return None, {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = model.shape
    bf16 = torch.bfloat16
    if seg.kind == "decode":
        q = torch.randn(seg.n, s.kv_heads, s.heads // s.kv_heads, s.head_dim, device="cuda", dtype=bf16)
        n_ctx = seg.length + 1
        kv = [(seg.kc[i][:, :, :n_ctx], seg.vc[i][:, :, :n_ctx]) for i in range(s.layers)]
        causal, allow_math = False, True
    else:
        q = torch.randn(seg.n, s.heads, seg.length, s.head_dim, device="cuda", dtype=bf16)
        kx = torch.randn_like(q)
        kv = [(kx, kx)] * s.layers
        causal, allow_math = True, seg.n * seg.length * seg.length <= 8192 * 2048
    names = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"] + (["MATH"] if allow_math else [])
    times: dict[str, float | None] = {}
    F = torch.nn.functional
    for name in names:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue

        def all_layers(backend: Any = backend) -> None:
            with sdpa_kernel([backend]):
                for k, v in kv:
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        try:
            g = capture_graph(torch, all_layers)
            times[name] = clock.time(g.replay, 1, 5)["median_s"]
            del g
        except RuntimeError:  # the backend refuses this shape, or cannot be captured
            times[name] = None
            torch.cuda.synchronize()
    ok = {n: t for n, t in times.items() if t is not None}
    if not ok:
        return None, times
    best = min(ok, key=ok.__getitem__)
    return [getattr(SDPBackend, best)], times


# ------------------------------------------------------------------------------------------------- measuring


def default_grids(tiny: bool) -> dict[str, Sequence[tuple[int, ...]]]:
    """prefill: (n prompts, length); decode: (batch, context); mixed: (batch, context, prefill tokens)."""
    if tiny:
        return {"prefill": [(1, 32), (1, 128), (4, 64)], "decode": [(1, 32), (4, 128), (8, 256)],
                "mixed": [(4, 64, 32)]}
    prefill = [(1, L) for L in (128, 256, 512, 1024, 2048, 4096, 8192)]
    prefill += [(64, 128), (16, 512), (8, 1024), (4, 2048), (2, 4096)]  # 8192-token steps of shorter prompts
    batches = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
    contexts = (128, 512, 1024, 2048, 4096, 8192)
    decode = [(b, c) for b in batches for c in contexts]
    # Chunked-prefill steps: a decode batch plus one prompt chunk, within the 8192-token budget.
    mixed = [(32, 1024, 512), (128, 1024, 512), (256, 1024, 512), (64, 2048, 2048), (256, 512, 2048),
             (128, 1024, 8064), (256, 512, 7936)]
    return {"prefill": prefill, "decode": decode, "mixed": mixed}


class Recorder:
    """The measurements document; rewritten after every section so a cut-off run still leaves its numbers."""

    def __init__(self, path: str, doc: dict[str, Any]) -> None:
        self.path, self.doc = path, doc

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.doc, fh, indent=1)
        os.replace(tmp, self.path)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    shape = TINY if args.tiny else LLAMA3_8B
    clock = Clock(torch, cuda)
    torch.manual_seed(args.seed)
    doc: dict[str, Any] = {
        "schema": 2,
        "command": "python3 -m backends.sim.calibrate " + " ".join(args.argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": asdict(shape) | {"kv_bytes_per_token": shape.kv_bytes_per_token,
                                  "weight_read_bytes": shape.weight_read_bytes,
                                  "total_weight_bytes": shape.total_weight_bytes},
        "method": {
            "kv_cache": "contiguous per sequence, random contents",
            "dtype": "bfloat16",
            "t_eager_s": "plain PyTorch ops launched from Python, no CUDA graph",
            "t_graph_plain_s": "the same ops replayed as one CUDA graph",
            "t_graph_s": "CUDA graph with vLLM-style fused pointwise kernels (residual+RMSNorm, rotary q+k, "
                         "SiLU*mul) compiled by torch.compile",
            "t_roofline_s": "max(bytes / HBM copy bandwidth, FLOPs / matmul rate): weights and KV read once",
            "attention": "scaled_dot_product_attention with the backend fastest for the shape (timed as a graph)",
            "decode_attention": "grouped-query as a (heads/kv_heads)-row query per KV head",
        },
        "skipped": [],
    }
    rec = Recorder(args.out, doc)
    if cuda:
        from backends.gpu_checks.cuda_offload_check import environment

        doc["env"] = environment(torch)
    else:
        doc["env"] = {"torch": torch.__version__, "device": "cpu"}
    rec.save()

    def left() -> float:
        return deadline - time.perf_counter()

    # 1. Ceilings: HBM copy bandwidth (bytes read + written) and bf16 matrix-product rate, on random data.
    n_copy = (1 << 30) // 2 if cuda else 1 << 20
    src = [torch.randn(n_copy, device=args.device, dtype=torch.bfloat16) for _ in range(2)]
    dst = torch.empty_like(src[0])
    it = itertools.cycle(src)
    t_copy = clock.time(lambda: dst.copy_(next(it)), 3, 20)["median_s"]
    hbm = 2 * n_copy * 2 / t_copy
    src = dst = None  # type: ignore[assignment]  # free the 3 GiB
    m = 8192 if cuda else 256
    mats = [(torch.randn(m, m, device=args.device, dtype=torch.bfloat16),
             torch.randn(m, m, device=args.device, dtype=torch.bfloat16)) for _ in range(2)]
    out = torch.empty(m, m, device=args.device, dtype=torch.bfloat16)
    it2 = itertools.cycle(mats)

    def mm() -> None:
        a, b = next(it2)
        torch.mm(a, b, out=out)

    t_mm = clock.time(mm, 3, 20)["median_s"]
    rate = 2 * m**3 / t_mm
    mats = out = None  # type: ignore[assignment]
    doc["ceilings"] = {"hbm_copy_bytes_per_s": hbm, "copy_bytes": 2 * n_copy * 2, "matmul_flops_per_s": rate,
                       "matmul_size": m}
    rec.save()

    # 2. The model, and device KV capacity the way vLLM sizes it.
    if cuda:
        torch.cuda.empty_cache()
        base_alloc = torch.cuda.memory_allocated()
    model = RandomLlama(torch, shape, args.device, seed=args.seed)
    pool_tokens = args.kv_pool_tokens if not args.tiny else 8 * 1024
    per_token_elems = shape.kv_bytes_per_token // 2
    if cuda:
        weights = torch.cuda.memory_allocated() - base_alloc
        free, total = torch.cuda.mem_get_info()
        other = (total - free) - torch.cuda.memory_reserved()  # CUDA context, cuBLAS workspaces, ...
        # Activation peak of one max_num_batched_tokens forward (vLLM's profile run), with its KV excluded.
        tmp = torch.empty(args.max_num_batched_tokens * per_token_elems, device="cuda", dtype=torch.bfloat16)
        kc, vc = kv_views(tmp, shape, 1, args.max_num_batched_tokens)
        toks = torch.randint(0, shape.vocab, (args.max_num_batched_tokens,), device="cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logits = model.forward(toks, [Segment("prefill", 1, args.max_num_batched_tokens, kc, vc)], logits=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        finite = bool(torch.isfinite(logits).all())
        del tmp, kc, vc, toks, logits
        torch.cuda.empty_cache()
        cap = {"total_bytes": total, "weights_bytes": weights, "non_torch_bytes": other,
               "activation_peak_bytes": peak, "activation_probe_tokens": args.max_num_batched_tokens,
               "prefill_logits_finite": finite}
        for util in (0.9, 0.3):
            kv = util * total - weights - peak - other
            cap[f"kv_tokens_at_{util}"] = max(0, int(kv // shape.kv_bytes_per_token) // 16 * 16)
        doc["kv_capacity"] = cap
        rec.save()
    pool = torch.empty(pool_tokens * per_token_elems, device=args.device, dtype=torch.bfloat16)
    for chunk in pool.split(1 << 30):  # random KV (never time on zeros), filled in 2 GiB pieces
        chunk.normal_()
    doc["kv_pool_tokens"] = pool_tokens

    # 3. Fused pointwise kernels (compiled once, dynamic shapes).
    t0 = time.perf_counter()
    doc["fusion"] = {"enabled": (not args.no_fusion) and model.enable_fusion(), "error": model.fuse_error}
    doc["fusion"]["compile_s"] = time.perf_counter() - t0
    rec.save()

    grids = default_grids(args.tiny)
    if args.quick:
        grids = {"prefill": grids["prefill"][:3:2], "decode": [(1, 1024), (64, 1024)], "mixed": grids["mixed"][:1]}
    for kind in grids:
        doc[kind] = []
    s = shape

    def run_point(kind: str, segs: list[Segment], tokens: Any) -> None:
        picks = [pick_attention(torch, clock, model, seg, cuda) for seg in segs]
        for seg, (backend, _) in zip(segs, picks):
            seg.backend = backend
        step = lambda: model.forward(tokens, segs)  # noqa: E731
        model.set_fused(False)
        if kind == "decode" and not doc.get("decode_logits_finite_checked"):
            doc["decode_logits_finite"] = bool(torch.isfinite(model.forward(tokens, segs, logits=True)).all())
            doc["decode_logits_finite_checked"] = True
        heavy = sum(seg.rows for seg in segs) >= 4096
        eager = clock.time(step, 1, 3 if heavy else 5)
        extra: dict[str, Any] = {}
        graphs: dict[str, float | None] = {"t_graph_plain_s": None, "t_graph_s": None}
        if cuda and not args.no_graphs:
            for key, fused in (("t_graph_plain_s", False), ("t_graph_s", True)):
                model.set_fused(fused)
                for attempt in ("picked", "default"):  # retry with torch's own attention choice if capture fails
                    if attempt == "default":
                        for seg in segs:
                            seg.backend = None
                    try:
                        g = capture_graph(torch, step)
                        graphs[key] = clock.time(g.replay, 3, 8 if heavy else 30)["median_s"]
                        del g
                        break
                    except RuntimeError as exc:
                        extra[f"{key}_error"] = f"{attempt}: {str(exc)[:300]}"
                        torch.cuda.synchronize()
                for seg, (backend, _) in zip(segs, picks):
                    seg.backend = backend
        model.set_fused(False)
        dec = [seg for seg in segs if seg.kind == "decode"]
        pre = [seg for seg in segs if seg.kind == "prefill"]
        desc = [(seg.kind, seg.n, seg.length) for seg in segs]
        cost = step_cost(s, desc)
        attn_best = [min(t for t in times.values() if t is not None) if any(times.values()) else None
                     for _, times in picks]
        pt = {
            "kind": kind,
            "segments": desc,
            "n": segs[0].n,
            "length": segs[0].length,
            "decode_tokens": sum(seg.n for seg in dec),
            "prefill_tokens": sum(seg.rows for seg in pre),
            "scheduled_tokens": sum(seg.rows for seg in segs),
            # each decoding request's context includes the token being computed (backends/sim/profile.py)
            "attended_kv_tokens": sum(seg.n * (seg.length + 1) for seg in dec),
            "t_eager_s": eager["median_s"],
            **graphs,
            "t_roofline_s": roofline_s(cost, hbm, rate),
            "bytes": cost["bytes"],
            "flops": cost["flops"],
            "attn_backends": [b[0].name if b else "default" for b, _ in picks],
            "attn_all_layers_s": attn_best,
            "attn_times_s": [times for _, times in picks],
        } | extra
        doc[kind].append(pt)

        def ms(v: float | None) -> str:
            return f"{v * 1e3:8.2f}" if v is not None else "     n/a"

        print(f"{kind:7s} {desc} eager {ms(pt['t_eager_s'])} graph {ms(pt['t_graph_plain_s'])} "
              f"fused+graph {ms(pt['t_graph_s'])} roofline {ms(pt['t_roofline_s'])} ms attn {pt['attn_backends']}",
              flush=True)

    # 4. Prefill sweep.
    for n, L in grids["prefill"]:
        if n * L > pool_tokens or s.max_model_len < L or left() < 90:
            doc["skipped"].append({"kind": "prefill", "n": n, "length": L})
            continue
        kc, vc = kv_views(pool, s, n, L)
        toks = torch.randint(0, s.vocab, (n * L,), device=args.device)
        run_point("prefill", [Segment("prefill", n, L, kc, vc)], toks)
        if cuda:
            torch.cuda.empty_cache()
    rec.save()

    # 5. Decode sweep.
    for B, C in grids["decode"]:
        if pool_tokens < B * (C + 1) or s.max_model_len < C or left() < 60:
            doc["skipped"].append({"kind": "decode", "n": B, "length": C})
            continue
        kc, vc = kv_views(pool, s, B, C + 1)
        toks = torch.randint(0, s.vocab, (B,), device=args.device)
        run_point("decode", [Segment("decode", B, C, kc, vc)], toks)
    rec.save()

    # 6. Mixed (chunked-prefill) steps: a decode batch and one prompt chunk in one forward.
    for B, C, P in grids["mixed"]:
        if pool_tokens < B * (C + 1) + P or left() < 45:
            doc["skipped"].append({"kind": "mixed", "n": B, "length": C, "prefill": P})
            continue
        kc, vc = kv_views(pool, s, B, C + 1)
        kp, vp = kv_views(pool, s, 1, P, offset_tokens=B * (C + 1))
        toks = torch.randint(0, s.vocab, (B + P,), device=args.device)
        run_point("mixed", [Segment("decode", B, C, kc, vc), Segment("prefill", 1, P, kp, vp)], toks)
        if cuda:
            torch.cuda.empty_cache()
    rec.save()

    # 7. KV block copies alone and while a decode step / a prefill runs on the main stream.
    if cuda and not args.no_copies and left() > 30:
        model.set_fused(True)
        doc["copy"] = measure_copies(torch, model, pool, shape, args)
        model.set_fused(False)
        rec.save()
    elif cuda:
        doc["skipped"].append({"kind": "copy"})
    doc["elapsed_s"] = time.perf_counter() - t_start
    rec.save()
    return doc


def measure_copies(torch: Any, model: RandomLlama, pool: Any, shape: ModelShape,
                   args: argparse.Namespace) -> dict[str, Any]:
    import random

    from backends.gpu_checks import cuda_offload_check as oc

    rng = random.Random(args.seed)
    gate = oc.Gate(torch)
    streams = {"d2h": torch.cuda.Stream(), "h2d": torch.cuda.Stream()}
    n_dev = 64 if args.quick else 512
    blocks = oc.KVPools(torch, n_dev, n_dev, "block")
    out: dict[str, Any] = {"block_bytes": oc.BLOCK_BYTES}
    B, C = (64, 1024) if args.quick else (128, 1024)
    kc, vc = kv_views(pool, shape, B, C + 1)
    toks = torch.randint(0, shape.vocab, (B,), device="cuda")
    g = capture_graph(torch, lambda: model.forward(toks, [Segment("decode", B, C, kc, vc)]))
    out["with_decode"] = oc.measure_copies_with(torch, gate, blocks, rng, streams, g.replay,
                                                f"decode B={B} C={C} (graph)", n_dev // 2, 2)
    del g
    L = 2048
    kc, vc = kv_views(pool, shape, 1, L)
    toks = torch.randint(0, shape.vocab, (L,), device="cuda")
    g = capture_graph(torch, lambda: model.forward(toks, [Segment("prefill", 1, L, kc, vc)]))
    out["with_prefill"] = oc.measure_copies_with(torch, gate, blocks, rng, streams, g.replay,
                                                 f"prefill L={L} (graph)", n_dev // 2, 2)
    del g
    return out


# ------------------------------------------------------------------------------------------------------ fitting


Point = dict[str, Any]


def _lstsq_nonneg(A: Any, b: Any) -> Any:
    """Least squares with every coefficient >= 0 (few columns: try every support, keep the best feasible)."""
    import numpy as np

    ncol = A.shape[1]
    best, best_res = np.zeros(ncol), float(b @ b)
    for r in range(1, ncol + 1):
        for cols in itertools.combinations(range(ncol), r):
            x, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
            if (x < 0).any():
                continue
            full = np.zeros(ncol)
            full[list(cols)] = x
            res = float(((A @ full) - b) @ ((A @ full) - b))
            if res < best_res:
                best, best_res = full, res
    return best


def fit_linear(points: list[Point], key: str) -> dict[str, Any]:
    """Fit t = base + per_token * tokens + per_kv * kv_tokens minimising the squared relative error."""
    import numpy as np

    X = np.array([[1.0, p["scheduled_tokens"], p["attended_kv_tokens"]] for p in points])
    y = np.array([p[key] for p in points])
    scale = np.array([1e-3, 1e-5, 1e-8])  # condition the columns
    coef = _lstsq_nonneg((X * scale) / y[:, None], np.ones(len(y))) * scale
    return {"base_s": float(coef[0]), "per_token_s": float(coef[1]), "per_kv_token_s": float(coef[2])} | _errors(
        X @ coef, y)


def fit_split(points: list[Point], key: str) -> dict[str, Any]:
    """Linear fit with separate prices for decode and prefill tokens (a candidate cost-model extension)."""
    import numpy as np

    X = np.array([[1.0, p["decode_tokens"], p["prefill_tokens"], p["attended_kv_tokens"]] for p in points])
    y = np.array([p[key] for p in points])
    scale = np.array([1e-3, 1e-5, 1e-5, 1e-8])
    coef = _lstsq_nonneg((X * scale) / y[:, None], np.ones(len(y))) * scale
    return {"base_s": float(coef[0]), "per_decode_token_s": float(coef[1]), "per_prefill_token_s": float(coef[2]),
            "per_kv_token_s": float(coef[3])} | _errors(X @ coef, y)


def fit_two_regime(points: list[Point], key: str, minimax: bool = True) -> dict[str, Any]:
    """Fit the cost-model form this calibration proposes (docs/calibration.md):

        t = max(base_s + per_token_s * tokens, compute_per_token_s * tokens) + per_kv_token_s * kv_tokens

    the larger of a memory-bound line (weights read once per step, plus a small per-token cost) and a
    compute-bound line (FLOPs per token at the achieved rate), plus the KV reads. Regimes are assigned
    alternately with a linear fit; with `minimax`, relative errors are reweighted (Lawson) to shrink the worst.
    """
    import numpy as np

    tok = np.array([float(p["scheduled_tokens"]) for p in points])
    kv = np.array([float(p["attended_kv_tokens"]) for p in points])
    y = np.array([p[key] for p in points])

    def design(compute: Any) -> Any:
        X = np.zeros((len(y), 4))
        X[~compute, 0], X[~compute, 1], X[compute, 2], X[:, 3] = 1.0, tok[~compute], tok[compute], kv
        return X

    def predict(c: Any) -> Any:
        return np.maximum(c[0] + c[1] * tok, c[2] * tok) + c[3] * kv

    compute = tok > np.median(tok)
    w = np.ones(len(y))
    coef = np.zeros(4)
    for _ in range(200 if minimax else 30):
        X = design(compute)
        scale = np.abs(X).max(axis=0)
        scale[scale == 0] = 1.0
        sw = np.sqrt(w)
        coef = _lstsq_nonneg((X / scale) / y[:, None] * sw[:, None], sw) / scale
        new = coef[2] * tok > coef[0] + coef[1] * tok
        rel = predict(coef) / y - 1
        if minimax:
            w = w * np.abs(rel) + 1e-12
            w /= w.sum()
        elif (new == compute).all():
            break
        compute = new
    return {"base_s": float(coef[0]), "per_token_s": float(coef[1]), "compute_per_token_s": float(coef[2]),
            "per_kv_token_s": float(coef[3])} | _errors(predict(coef), y)


def predict_step(step: dict[str, float], tokens: int, kv: int) -> float:
    """The simulated engine's price of a step with these coefficients (linear when compute_per_token_s is absent)."""
    return step_seconds(step["base_s"], step["per_token_s"], step.get("compute_per_token_s", 0.0),
                        step["per_kv_token_s"], tokens, kv)


def _errors(pred: Any, y: Any) -> dict[str, Any]:
    import numpy as np

    rel = (pred - y) / y
    return {"max_rel_err": float(np.abs(rel).max()), "rms_rel_err": float(np.sqrt((rel**2).mean())),
            "n_points": len(y), "predicted_s": [float(v) for v in pred]}



# The benchmark's operating range (docs/calibration.md): decode batches of 1..256 at any context up to
# max_model_len, chunked-prefill steps (a decode batch plus a prompt chunk) within the 8192-token budget, and
# prefill-only steps of 1024..8192 tokens. Prefill-only steps of fewer tokens (a lone short prompt on an idle
# engine) are left out: under the benchmark's load a prompt always shares its step with running decodes.
OPERATING_RANGE = {"decode_max_context": 8192, "prefill_min_tokens": 1024, "prefill_max_tokens": 8192}


def in_range(p: Point, rng: dict[str, int]) -> bool:
    if p["kind"] == "decode":
        return p["length"] <= rng["decode_max_context"]
    if p["kind"] == "mixed":  # a decode batch plus a prompt chunk within the step's token budget
        return p["length"] <= rng["decode_max_context"] and p["scheduled_tokens"] <= rng["prefill_max_tokens"]
    return rng["prefill_min_tokens"] <= p["scheduled_tokens"] <= rng["prefill_max_tokens"]


def select_points(doc: dict[str, Any], key: str, rng: dict[str, int] | None) -> list[Point]:
    pts = [p for p in doc.get("prefill", []) + doc.get("decode", []) + doc.get("mixed", []) if p.get(key) is not None]
    return [p for p in pts if rng is None or in_range(p, rng)]


def fit_all(doc: dict[str, Any]) -> dict[str, Any]:
    """Every candidate fit (data source x range x cost-model form), for the report."""
    out: dict[str, Any] = {}
    for key in ("t_graph_s", "t_graph_plain_s", "t_eager_s", "t_roofline_s"):
        for rname, rng in (("all", None), ("operating", OPERATING_RANGE)):
            pts = select_points(doc, key, rng)
            if len(pts) < 4:
                continue
            for form, fn in (("linear", fit_linear), ("split", fit_split), ("two-regime", fit_two_regime)):
                r = fn(pts, key)
                r.pop("predicted_s")
                out[f"{key}/{rname}/{form}"] = r
    return out


# --------------------------------------------------------------------------------------------- profile writing


def _card(doc: dict[str, Any]) -> tuple[str, str]:
    env = doc["env"]
    smi = [x.strip() for x in env.get("nvidia_smi", "").split(",")]
    card = smi[0] if smi and smi[0] else env.get("device", "?")
    return card, smi[1] if len(smi) > 1 else "?"


def point_row(p: Point) -> dict[str, Any]:
    """A measured step in the sim's terms: its decode batch and context, its prefill tokens, the two counts."""
    dec = [seg for seg in p["segments"] if seg[0] == "decode"]
    return {"kind": p["kind"], "decode_batch": dec[0][1] if dec else 0, "decode_context": dec[0][2] if dec else 0,
            "prefill_tokens": p["prefill_tokens"], "scheduled_tokens": p["scheduled_tokens"],
            "attended_kv_tokens": p["attended_kv_tokens"]}


def write_profile(doc: dict[str, Any], raw_path: str, profile_path: str, key: str, rng: dict[str, int],
                  host_tokens: int, util: float, fit_command: str, offload_path: str | None) -> dict[str, Any]:
    """Write the profile: ``step:`` is the two-regime fit over every measured step; the best linear fit (over the
    benchmark's operating range) stays under ``measurements.linear_step`` for reference. Returns both fits'
    errors, computed through the simulated engine's own formula."""
    shape = doc["model"]
    every = select_points(doc, key, None)
    ranged = select_points(doc, key, rng)
    two = fit_two_regime(every, key)
    step = {k: two[k] for k in ("base_s", "per_token_s", "compute_per_token_s", "per_kv_token_s")}
    lin = fit_linear(ranged, key)
    linear = {k: lin[k] for k in ("base_s", "per_token_s", "per_kv_token_s")}
    env = doc["env"]
    card, driver = _card(doc)
    cap = doc.get("kv_capacity", {})
    device_tokens = cap.get(f"kv_tokens_at_{util}", 0)
    copy = doc.get("copy", {}).get("with_decode", {})
    d2h = copy.get("d2h", {}).get("copy_gb_per_s_with_compute", {}).get("d2h", 0.0) * 1e9
    h2d = copy.get("h2d", {}).get("copy_gb_per_s_with_compute", {}).get("h2d", 0.0) * 1e9

    def err(coef: dict[str, float], p: Point) -> float:
        return predict_step(coef, p["scheduled_tokens"], p["attended_kv_tokens"]) / p[key] - 1

    def summary(coef: dict[str, float], pts: list[Point]) -> dict[str, Any]:
        errs = [err(coef, p) for p in pts]
        worst = max(range(len(pts)), key=lambda i: abs(errs[i]))
        return {"max_rel_err": abs(errs[worst]), "rms_rel_err": (sum(e * e for e in errs) / len(errs)) ** 0.5,
                "n_points": len(pts), "worst": pts[worst]}

    fit, lfit, lall = summary(step, every), summary(linear, ranged), summary(linear, every)
    slope = step["compute_per_token_s"] - step["per_token_s"]
    crossover = step["base_s"] / slope if slope > 0 else float("inf")
    # 2 FLOPs per layer matmul weight (2 bytes each) per token; the LM head runs once per prompt, not per token
    flops_per_token = shape["weight_read_bytes"] - 2 * shape["vocab"] * shape["hidden"]
    tflops = flops_per_token / step["compute_per_token_s"] / 1e12 if step["compute_per_token_s"] > 0 else 0.0
    gib = 1 << 30
    ceil = doc["ceilings"]
    rows = []
    for p in every:
        r = point_row(p)
        rows.append([r["kind"], r["decode_batch"], r["decode_context"], r["prefill_tokens"], r["scheduled_tokens"],
                     r["attended_kv_tokens"], round(p[key], 6),
                     round(predict_step(step, p["scheduled_tokens"], p["attended_kv_tokens"]), 6),
                     round(predict_step(linear, p["scheduled_tokens"], p["attended_kv_tokens"]), 6),
                     in_range(p, rng)])
    cw = {k: doc.get("copy", {}).get("with_decode", {}).get(k, {}) for k in ("d2h", "h2d", "bidir")}
    text = f"""# Hardware profile for the simulated engine: Llama3-8B (bf16) on one {card}.
# MEASURED (docs/calibration.md) on {card}, driver {driver}, torch {env.get('torch')} (CUDA {env.get('cuda')}),
# {doc.get('started_utc')}, by `bash backends/gpu_checks/run_calibration.sh`, which runs
#   {doc['command']}
# and fitted here with
#   {fit_command}
# Data: CUDA-graph replays of a Llama3-8B-shaped forward (random weights) with cuBLAS GEMMs, vLLM-style fused
# pointwise kernels and the fastest SDPA attention kernel per shape: what a tuned engine runs. Not the eager
# forward (launch-bound: decode steps 1.1-5x slower) and not the roofline (a floor no engine reaches).
# Step time model (backends/sim/profile.py step_seconds, docs/sim-cost-model.md), two regimes:
#   t_step = max(base_s + per_token_s * scheduled_tokens, compute_per_token_s * scheduled_tokens)
#            + per_kv_token_s * attended_kv_tokens
# fitted to all {fit['n_points']} measured steps (decode, prefill and decode + prompt-chunk steps; minimax on relative
# error): max error {100 * fit['max_rel_err']:.1f}% (worst: {fit['worst']['kind']} {fit['worst']['segments']}), rms {100 * fit['rms_rel_err']:.1f}%.
# A decode token costs ~{1e6 * step['per_token_s']:.1f} us on top of the {1e3 * step['base_s']:.2f} ms weight read; a prefill token ~{1e6 * step['compute_per_token_s']:.1f} us
# (matmuls at ~{tflops:.0f} TFLOP/s): steps of more than ~{crossover:.0f} tokens are compute-bound.
# The linear form (compute_per_token_s = 0) cannot get within 10%: its best fit, over the {lfit['n_points']} steps of the
# benchmark's operating range, is off by up to {100 * lfit['max_rel_err']:.1f}% (rms {100 * lfit['rms_rel_err']:.1f}%; {100 * lall['max_rel_err']:.1f}% over all steps); it is kept
# for reference under measurements.linear_step.
name: h100-llama3-8b
description: Llama3-8B bf16 on one H100 80GB HBM3; cost model fitted to measured CUDA-graph forwards
source: measured
model:
  name: llama3-8b
  kv_bytes_per_token: {shape['kv_bytes_per_token']}      # 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes
  max_model_len: {shape['max_model_len']}
step:
  base_s: {step['base_s']:.5e}
  per_token_s: {step['per_token_s']:.5e}
  compute_per_token_s: {step['compute_per_token_s']:.5e}
  per_kv_token_s: {step['per_kv_token_s']:.5e}
batch:
  max_num_seqs: 256
  max_num_batched_tokens: 8192     # chunked-prefill token budget per step
  block_size: 16
kv:
  # vLLM's own sizing at its default gpu-memory-utilization {util}: {util} x {cap.get('total_bytes', 0) / gib:.2f} GiB - weights
  # {cap.get('weights_bytes', 0) / gib:.2f} GiB - activation peak of an 8192-token step {cap.get('activation_peak_bytes', 0) / gib:.2f} GiB
  # - CUDA context and libraries {cap.get('non_torch_bytes', 0) / gib:.2f} GiB, over 128 KiB a token, in 16-token blocks.
  # (The paper's mem-frac 0.3 would leave {cap.get('kv_tokens_at_0.3', 0)} tokens on this 80 GB card.)
  device_tokens: {device_tokens}
  host_tokens: {host_tokens}           # {host_tokens * shape['kv_bytes_per_token'] / gib:.0f} GiB of pinned host memory for KV
transfer:
  # 2 MiB KV blocks between device and pinned host on a side stream, measured while decode steps run
  # (PCIe Gen5 x16; one direction at a time; both at once each get ~0.9x of this).
  h2d_bytes_per_s: {h2d:.3e}
  d2h_bytes_per_s: {d2h:.3e}
measurements:
  raw: {raw_path}
  offload_check: {offload_path}
  card: "{card}"
  driver: "{driver}"
  torch: "{env.get('torch')}"
  cuda: "{env.get('cuda')}"
  measured_utc: "{doc.get('started_utc')}"
  data: {key}
  hbm_copy_bytes_per_s: {ceil['hbm_copy_bytes_per_s']:.3e}
  matmul_flops_per_s: {ceil['matmul_flops_per_s']:.3e}
  fit_form: two-regime
  fit_points: {fit['n_points']}
  fit_max_rel_err: {fit['max_rel_err']:.4f}
  fit_rms_rel_err: {fit['rms_rel_err']:.4f}
  linear_step:
    form: "base_s + per_token_s * scheduled_tokens + per_kv_token_s * attended_kv_tokens"
    base_s: {linear['base_s']:.5e}
    per_token_s: {linear['per_token_s']:.5e}
    per_kv_token_s: {linear['per_kv_token_s']:.5e}
    fit_range: {json.dumps(rng)}
    fitted_on: the {lfit['n_points']} measured steps of fit_range (least squares on relative error)
    max_rel_err: {lfit['max_rel_err']:.4f}
    rms_rel_err: {lfit['rms_rel_err']:.4f}
    all_points_max_rel_err: {lall['max_rel_err']:.4f}
  kv_capacity_tokens: {{util_0.9: {cap.get('kv_tokens_at_0.9', 0)}, util_0.3: {cap.get('kv_tokens_at_0.3', 0)}}}
  copy_gb_per_s_with_decode: {{d2h: {cw['d2h'].get('copy_gb_per_s_with_compute', {}).get('d2h', 0):.1f}, h2d: {cw['h2d'].get('copy_gb_per_s_with_compute', {}).get('h2d', 0):.1f}, bidir_each: {min(cw['bidir'].get('copy_gb_per_s_with_compute', {'x': 0}).values()):.1f}, decode_step_slowdown_pct: {max(v.get('compute_slowdown_pct', 0) for v in cw.values()):.1f}}}
  # kind, decode batch, decode context, prefill tokens, scheduled_tokens, attended_kv_tokens,
  # measured_s, step: prediction, linear_step prediction, in linear_step.fit_range
  points:
"""
    text += "".join(f"  - {json.dumps(r)}\n" for r in rows)
    with open(profile_path, "w") as fh:
        fh.write(text)
    return {"two_regime": fit, "linear": lfit}


# -------------------------------------------------------------------------------------------------------- CLI


def print_tables(doc: dict[str, Any]) -> None:
    c = doc.get("ceilings", {})
    if c:
        print(f"HBM copy {c['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s; "
              f"matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    if "kv_capacity" in doc:
        k = doc["kv_capacity"]
        print(f"KV tokens at 0.9: {k['kv_tokens_at_0.9']}, at 0.3: {k['kv_tokens_at_0.3']} "
              f"(activation peak {k['activation_peak_bytes'] / 2**30:.2f} GiB)")
    for name, r in sorted(fit_all(doc).items()):
        coefs = " ".join(f"{k}={v:.3e}" for k, v in r.items() if k.endswith("_s"))
        print(f"fit {name:36s} max {100 * r['max_rel_err']:6.1f}% rms {100 * r['rms_rel_err']:5.1f}% "
              f"n={r['n_points']:3d} {coefs}")
    for where in ("with_decode", "with_prefill"):
        r = doc.get("copy", {}).get(where)
        if not r:
            continue
        for kind in ("d2h", "h2d", "bidir"):
            s = r[kind]
            print(f"copy {where:12s} {kind:5s} alone {s['copy_gb_per_s_alone']} with {s['copy_gb_per_s_with_compute']}"
                  f" step slowdown {s['compute_slowdown_pct']:.1f}% overlap {s['overlap_fraction']:.2f}")


def trace_steps(trace: str) -> Iterator[dict[str, Any]]:
    """The steps of a plugin step trace (gzip or plain JSON lines), in order."""
    opener: Any = gzip.open if trace.endswith(".gz") else open
    with opener(trace, "rt") as fh:
        for line in fh:
            yield json.loads(line)


def trace_points(trace: str, windows: list[tuple[float, float]]) -> list[Point]:
    """Steps of a plugin step trace inside any of the windows (perf_counter)."""
    pts: list[Point] = []
    for st in trace_steps(trace):
        if st["dt"] > 0 and any(a <= st["t"] <= b for a, b in windows):
            pts.append({"scheduled_tokens": st["decode"] + st["prefill"], "attended_kv_tokens": st["decode_kv"],
                        "decode_tokens": st["decode"], "prefill_tokens": st["prefill"], "t_real_s": st["dt"]})
    return pts


def fit_trace(args: argparse.Namespace) -> dict[str, Any]:
    """Profile YAML from a real engine's step trace (see the module docstring)."""
    import numpy as np
    import yaml

    windows, runs = [], []
    preemptions = 0
    for rep in args.report:
        with open(rep) as f:
            doc = json.load(f)
        for pol, m in doc["policies"].items():
            w = m.get("machine", {}).get("window_perf_counter")
            if w and w[1]:
                windows.append((float(w[0]), float(w[1])))
                runs.append(f"{pol} ({rep})")
                preemptions += int(m.get("engine_counters", {}).get("preemptions", 0))
    pts = trace_points(args.trace, windows)
    if len(pts) < 16:
        raise SystemExit(f"fit-trace: only {len(pts)} steps inside the runs' windows")
    fit = fit_two_regime(pts, "t_real_s", minimax=False)
    c = {k: fit[k] for k in ("base_s", "per_token_s", "compute_per_token_s", "per_kv_token_s")}
    # The least-squares fit follows the many decode steps and underprices full prefill chunks (on the H200 run
    # they took 1.38x its price); when the trace has enough of them, the compute line is their median price.
    full = [p for p in pts if p["scheduled_tokens"] >= 0.85 * args.max_num_batched_tokens]
    chunk_note = ""
    if len(full) >= 16:
        c["compute_per_token_s"] = float(np.median(
            [(p["t_real_s"] - c["per_kv_token_s"] * p["attended_kv_tokens"]) / p["scheduled_tokens"] for p in full]))
        chunk_note = f"; compute_per_token_s the median of {len(full)} full prefill chunks"
    y = np.array([p["t_real_s"] for p in pts])
    pred = np.array([predict_step(c, int(p["scheduled_tokens"]), int(p["attended_kv_tokens"])) for p in pts])
    rel = np.abs(pred / y - 1)
    with open(args.engine) as f:
        eng = json.load(f)
    eng = eng.get("engine", eng)
    summary = (f"{len(pts)} steps of {', '.join(runs)}{chunk_note}; per-step relative error median {np.median(rel):.1%}, "
               f"p90 {np.percentile(rel, 90):.1%}; summed, the model gives {pred.sum() / y.sum():.2f}x the real "
               f"steps' time (the rest: steps stalled by preemption flushes and host copies, priced apart by the "
               f"simulator)")
    excess = float(y.sum() - pred.sum())
    preempt_s = None
    if preemptions:
        # the engine's own preemptions are where the rest goes (docs/sim-cost-model.md, "Engine preemption modes")
        summary += f"; {excess:.1f} s beyond the model over {preemptions} engine preemptions"
        # The simulator's cascade preempts more often than vLLM does (about twice, for the same run): spread over
        # its own count, the price keeps the run's total time beyond the model, which is what throughput follows.
        n = args.simulated_preemptions or preemptions
        preempt_s = float(f"{excess / n:.4g}")
        if args.simulated_preemptions:
            summary += f", spread over the {n} the simulator makes for the same run"
        summary += f": {preempt_s:.4g} s each (engine.preempt_s)"
    engine_section = None
    if os.path.exists(args.profile):  # a refit keeps the engine's preemption model, written by hand
        with open(args.profile) as f:
            engine_section = (yaml.safe_load(f) or {}).get("engine")
        if engine_section is not None and preempt_s is not None and args.simulated_preemptions:
            engine_section["preempt_s"] = preempt_s
    profile = {
        "name": args.name,
        "description": args.description,
        "source": "measured",
        "model": {"name": args.model_name, "kv_bytes_per_token": int(eng["kv_bytes_per_token"]),
                  "max_model_len": args.max_model_len},
        "step": {k: float(f"{v:.6g}") for k, v in c.items()},
        "batch": {"max_num_seqs": int(eng["max_num_seqs"]), "max_num_batched_tokens": args.max_num_batched_tokens,
                  "block_size": int(eng["block_size"])},
        "kv": {"device_tokens": int(eng["kv_device_capacity_tokens"]),
               "host_tokens": int(eng["kv_host_capacity_tokens"]),
               # vLLM's offloading connector copies whole blocks: a request's unfilled last block is recomputed
               **({"host_copy_tokens": int(eng["block_size"])} if eng.get("kind") == "vllm" else {})},
        "transfer": {"h2d_bytes_per_s": float(f"{args.h2d:.4g}"), "d2h_bytes_per_s": float(f"{args.d2h:.4g}")},
        "measurements": {"trace": args.trace, "reports": args.report, "engine": args.engine, "fit": summary},
    }
    if engine_section:
        profile["engine"] = engine_section
    header = (f"# Hardware profile for the simulated engine, MEASURED: fitted to a real engine's steps by\n"
              f"#   python3 -m backends.sim.calibrate {shlex.join(args.argv)}\n# {summary}\n")
    with open(args.profile, "w") as fh:
        fh.write(header + yaml.safe_dump(profile, sort_keys=False))
    print(f"wrote {args.profile}: {summary}")
    return profile


def step_cost_fit(steps: Sequence[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """Least squares of a step's time over its work, ``dt = base + per_decode * decode + per_prompt * prompt``, from
    ``(decode, prompt tokens, dt)`` per step: ``(base, per_decode, per_prompt)`` in seconds, or None with fewer steps
    than four (three terms to fit)."""
    import numpy as np

    if len(steps) < 4:
        return None
    x = np.array([[1.0, d, p] for d, p, _ in steps])
    coef = np.linalg.lstsq(x, np.array([dt for _, _, dt in steps]), rcond=None)[0]
    return float(coef[0]), float(coef[1]), float(coef[2])


def prefill_rates(args: argparse.Namespace) -> dict[str, Any]:
    """The prefill rate a run's state reports gave the policy, replayed from its step trace, per ``bin_s`` of the
    run (medians over its steps): the vLLM plugin's measure until 2026-12-04 (prompt tokens over the whole time of
    every step with prompt work, averaged 0.1 a step), the plugin's measure now (``tokenflow_vllm/rates.py``, run
    on the trace), and a least-squares fit of all the run's steps (dt = base + per decoding request + per prompt
    token) for reference. docs/sim-cost-model.md, "The prefill rate the engine reports"."""
    import numpy as np

    from . import plugin_rates

    now = plugin_rates.module().StepRates()
    with open(args.report) as f:
        m = next(iter(json.load(f)["policies"].values()))
    t0, t1 = m["machine"]["window_perf_counter"]
    old: float | None = None
    rows: list[tuple[float, float | None, float | None]] = []
    steps: list[tuple[float, float, float]] = []
    for st in trace_steps(args.trace):
        if not (t0 <= st["t"] <= t1) or st["dt"] <= 0:
            continue
        d, p, dt = st["decode"], st["prefill"], st["dt"]
        if p:
            old = p / dt if old is None else old + 0.1 * (p / dt - old)
        now.add_step(d, p, dt)
        rows.append((st["t"] - t0, old, now.prefill_rate))
        steps.append((d, p, dt))
    coef = step_cost_fit(steps) or (0.0, 0.0, 0.0)
    res: dict[str, Any] = {"fit_prefill_tokens_per_s": 1.0 / coef[2] if coef[2] > 0 else None, "bins": []}
    print(f"{len(rows)} steps; least-squares over them: base {coef[0] * 1e3:.2f} ms, {coef[1] * 1e6:.1f} us a decoding "
          f"request, {coef[2] * 1e6:.1f} us a prompt token ({res['fit_prefill_tokens_per_s'] or 0:.0f} tok/s)")
    print(f"{'run s':>9} {'before 2026-12-04':>18} {'now':>8}   (prompt tokens/s the state reported, median)")
    end = rows[-1][0] if rows else 0.0
    a = 0.0
    while a < end:
        b = a + args.bin_s
        olds = [o for t, o, _ in rows if a <= t < b and o is not None]
        news = [n for t, _, n in rows if a <= t < b and n is not None]
        med_old = float(np.median(olds)) if olds else None
        med_new = float(np.median(news)) if news else None
        res["bins"].append({"from_s": a, "to_s": b, "before": med_old, "now": med_new})
        print(f"{a:4.0f}-{b:<4.0f} {med_old or 0:18.0f} {med_new or 0:8.0f}")
        a = b
    return res


SLOW_S = 0.015  # a step this much beyond the cost model (with nothing admitted or preempted) was held up


def fit_control(args: argparse.Namespace) -> dict[str, Any]:
    """``engine.state_s_per_held`` and ``engine.control_lag_steps`` from real runs' step traces (docs/sim-cost-model.md,
    "Control rounds"). Each run: TRACE REPORT SAMPLES (the step trace, the bench report whose window selects the
    steps, the engine samples of that run)."""
    import numpy as np

    from .profile import load_profile

    prof = load_profile(args.profile)
    rows_x: list[list[float]] = []
    rows_y: list[float] = []
    lags: list[int] = []
    for trace, rep, samples_path in args.run:
        with open(rep) as f:
            pol, m = next(iter(json.load(f)["policies"].items()))
        a, b = (float(x) for x in m["machine"]["window_perf_counter"])
        steps = [st for st in trace_steps(trace) if a <= st["t"] - st["dt"] and st["t"] <= b]
        with open(samples_path) as f:
            samples = json.load(f)[pol]
        # a quiet step: nothing admitted, nothing preempted, no prefill; its time beyond the model is the engine's
        # time spent outside the forward pass (control calls served between steps)
        slow = [0.0] * len(steps)
        for i in range(1, len(steps)):
            st, prev = steps[i], steps[i - 1]
            if st["prefill"] == 0 and st["running"] == prev["running"]:
                e = st["dt"] - prof.step_time(st["decode"], st["decode_kv"])
                slow[i] = e if e > SLOW_S else 0.0
        k = 0
        for s0, s1 in zip(samples, samples[1:]):
            t0, t1 = a + s0["t"], a + s1["t"]
            ex = 0.0
            while k < len(steps) and steps[k]["t"] < t1:
                if steps[k]["t"] >= t0:
                    ex += slow[k]
                k += 1
            rows_x.append([1.0, float(s1["num_held"] + s1["num_parked"])])
            rows_y.append(ex / (t1 - t0))
        # the control lag: a batch of the policy's preemptions lands in the step after the command call's (slow)
        # step, itself after the state read's (slow) step; count the steps from the read to the landing
        slow_idx = [i for i, e in enumerate(slow) if e > 2 * SLOW_S]
        for i in range(1, len(steps)):
            if steps[i]["running"] < steps[i - 1]["running"] - 3:
                prior = [j for j in slow_idx if i - 8 <= j < i]
                if len(prior) >= 2:
                    lags.append(i - prior[-2])
    coef, *_ = np.linalg.lstsq(np.array(rows_x), np.array(rows_y), rcond=None)
    per_held_s = float(coef[1]) / args.rounds_per_s
    lag = int(np.median(lags)) if lags else 0
    out = {"base_s_per_s": float(coef[0]), "per_held_s_per_s": float(coef[1]), "state_s_per_held": per_held_s,
           "intervals": len(rows_y), "landings": len(lags), "control_lag_steps": lag,
           "lag_counts": {str(n): lags.count(n) for n in sorted(set(lags))}}
    print(f"engine time in quiet steps beyond the model: {coef[0]:.4f} s/s + {coef[1] * 1000:.4f} ms/s per held or "
          f"parked request ({len(rows_y)} sample intervals); at {args.rounds_per_s:g} control rounds/s: "
          f"engine.state_s_per_held {per_held_s:.4g}")
    print(f"control lag: steps from the state read to the step with the preemptions, over {len(lags)} landings: "
          f"{out['lag_counts']}; median {lag} (engine.control_lag_steps)")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time the model on this machine's GPU; write raw JSON")
    m.add_argument("--out", required=True)
    m.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    m.add_argument("--tiny", action="store_true", help="a tiny model and grid (for a CPU smoke run)")
    m.add_argument("--quick", action="store_true", help="few points (a smoke run on the GPU)")
    m.add_argument("--no-graphs", action="store_true")
    m.add_argument("--no-copies", action="store_true")
    m.add_argument("--no-fusion", action="store_true", help="skip torch.compile of the pointwise kernels")
    m.add_argument("--kv-pool-tokens", type=int, default=262144 + 4096)
    m.add_argument("--max-num-batched-tokens", type=int, default=8192)
    m.add_argument("--budget-s", type=float, default=420.0, help="stop adding points after this many seconds")
    m.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("fit", help="fit the cost model to a measurements JSON; optionally write a profile")
    f.add_argument("raw")
    f.add_argument("--profile", help="write the profile YAML here")
    f.add_argument("--data", default="t_graph_s", choices=["t_graph_s", "t_eager_s", "t_roofline_s"])
    f.add_argument("--util", type=float, default=0.9, help="gpu-memory-utilization for device_tokens")
    f.add_argument("--host-tokens", type=int, default=2097152)
    f.add_argument("--offload-check", help="the offload check's JSON, to reference from the profile")
    t = sub.add_parser("fit-trace", help="fit the cost model to a real engine's step trace; write a profile")
    t.add_argument("trace", help="TOKENFLOW_STEP_TRACE output (JSON lines, optionally .gz)")
    t.add_argument("--report", action="append", required=True, help="bench report.json whose runs' windows to fit")
    t.add_argument("--engine", required=True, help="the engine's /control/v1/state (JSON) for KV sizes and limits")
    t.add_argument("--profile", required=True)
    t.add_argument("--name", required=True)
    t.add_argument("--description", default="")
    t.add_argument("--model-name", default="llama3-8b")
    t.add_argument("--max-model-len", type=int, default=8192)
    t.add_argument("--max-num-batched-tokens", type=int, default=8192)
    t.add_argument("--h2d", type=float, required=True, help="host -> device bytes/s (the plugin's measurement)")
    t.add_argument("--d2h", type=float, required=True, help="device -> host bytes/s")
    t.add_argument("--simulated-preemptions", type=int,
                   help="the engine preemptions the simulator makes for the fitted run: engine.preempt_s spreads the "
                        "time beyond the model over these (and is written into a kept engine section)")
    c = sub.add_parser("fit-control", help="engine time per control round and the control lag, from step traces")
    c.add_argument("--run", nargs=3, action="append", required=True, metavar=("TRACE", "REPORT", "SAMPLES"))
    c.add_argument("--profile", required=True, help="the profile whose step model prices the steps")
    c.add_argument("--rounds-per-s", type=float, default=2.0, help="the gateway's control rounds a second (1/tick)")
    r = sub.add_parser("prefill-rates", help="the prefill rate a run's state reports gave, replayed from its trace")
    r.add_argument("trace", help="TOKENFLOW_STEP_TRACE output (JSON lines, optionally .gz)")
    r.add_argument("--report", required=True, help="bench report.json of one run: its window selects the steps")
    r.add_argument("--bin-s", type=float, default=10.0)
    args = ap.parse_args(argv)
    args.argv = argv
    if args.cmd == "prefill-rates":
        prefill_rates(args)
        return 0
    if args.cmd == "fit-control":
        fit_control(args)
        return 0
    if args.cmd == "fit-trace":
        fit_trace(args)
        return 0
    if args.cmd == "measure":
        doc = measure(args)
        print_tables(doc)
        return 0
    with open(args.raw) as fh:
        doc = json.load(fh)
    print_tables(doc)
    if args.profile:
        fits = write_profile(doc, args.raw, args.profile, args.data, OPERATING_RANGE, args.host_tokens, args.util,
                             "python3 -m backends.sim.calibrate " + " ".join(argv), args.offload_check)
        two, lin = fits["two_regime"], fits["linear"]
        print(f"wrote {args.profile}: two-regime max error {100 * two['max_rel_err']:.1f}% (rms "
              f"{100 * two['rms_rel_err']:.1f}%) over {two['n_points']} points; linear (reference) "
              f"{100 * lin['max_rel_err']:.1f}% over {lin['n_points']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
