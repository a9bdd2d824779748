"""Calibrate the simulated engine's step-time model against a real CUDA GPU.

The simulated engine prices one step as

    t_step = base_s + per_token_s * scheduled_tokens + per_kv_token_s * attended_kv_tokens

(scheduled_tokens: decode plus prefill tokens in the step; attended_kv_tokens: the summed context lengths of the
decoding requests). ``measure`` times a Llama3-8B-shaped model (random bf16 weights built on the GPU; nothing is
downloaded) on the card it runs on, and writes the raw numbers as JSON:

- the two ceilings: device copy bandwidth (HBM) and bf16 matrix-product rate;
- prefill time against prompt length, and decode step time against batch size and context length, each as an
  eager forward and as a CUDA-graph replay of the same forward (cuBLAS GEMMs; FlashAttention or the fastest
  other scaled_dot_product_attention kernel for the shape; a contiguous KV cache);
- the roofline time of each point (weights and KV read once per step, FLOPs at the measured matmul rate);
- device KV capacity the way vLLM sizes it (gpu-memory-utilization x total - weights - activation peak - other);
- KV block copy bandwidth device -> pinned host -> device, alone and while a decode step (or a prefill) runs on
  the main stream.

``fit`` (CPU only; numpy and PyYAML) fits the three coefficients by least squares on relative error and writes a
profile in the simulated engine's YAML format. Run from the repository root:

    python3 -m backends.sim.calibrate measure --out h100.json            # on the GPU machine, torch only
    python3 -m backends.sim.calibrate fit h100.json --profile configs/profiles/h100-llama3-8b.yaml
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

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


def step_cost(shape: ModelShape, kind: str, batch: int, length: int) -> dict[str, float]:
    """Bytes and FLOPs of one step: `batch` decodes at context `length`, or `batch` prefills of `length` tokens."""
    kvb = shape.kv_bytes_per_token
    attn_per_pair = 4 * shape.heads * shape.head_dim * shape.layers  # QK^T and PV, 2 FLOPs per multiply-add
    if kind == "decode":
        tokens, kv_read, pairs, logit_rows = batch, batch * (length + 1), batch * (length + 1), batch
    else:
        tokens, kv_read, pairs, logit_rows = batch * length, 0, batch * length * (length + 1) // 2, batch
    flops = 2 * shape.layers * shape.layer_matmul_params * tokens + 2 * shape.vocab * shape.hidden * logit_rows
    flops += attn_per_pair * pairs
    return {"bytes": shape.weight_read_bytes + (kv_read + tokens) * kvb, "flops": float(flops)}


def roofline_s(cost: dict[str, float], hbm_bytes_per_s: float, flops_per_s: float) -> float:
    return max(cost["bytes"] / hbm_bytes_per_s, cost["flops"] / flops_per_s)


# ----------------------------------------------------------------------------------------- the model (torch)


class RandomLlama:
    """Llama3-shaped decoder with random bf16 weights; prefill and decode forwards over a contiguous KV cache."""

    def __init__(self, torch: Any, shape: ModelShape, device: str, seed: int = 0) -> None:
        self.torch, self.shape, self.device = torch, shape, device
        self.F = torch.nn.functional
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
        self.attn_backend: Any = None  # a list of SDPBackend, or None for torch's own choice

    def _rms(self, x: Any, w: Any) -> Any:
        if hasattr(self.F, "rms_norm"):
            return self.F.rms_norm(x, (x.shape[-1],), w, eps=1e-5)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * self.torch.rsqrt(var + 1e-5)).to(x.dtype) * w

    @staticmethod
    def _rope(x: Any, cos: Any, sin: Any, torch: Any) -> Any:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _sdpa(self, q: Any, k: Any, v: Any, causal: bool) -> Any:
        if self.attn_backend is None:
            return self.F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.attn_backend):
            return self.F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def _mlp(self, x: Any, p: dict[str, Any]) -> Any:
        g, u = self.F.linear(self._rms(x, p["ln2"]), p["wgu"]).chunk(2, dim=-1)
        return x + self.F.linear(self.F.silu(g) * u, p["wd"])

    def decode(self, tokens: Any, pos: int, kc: list[Any], vc: list[Any], logits: bool = False) -> Any:
        """One decode step: tokens [B] at position `pos` (context `pos`); caches [B, kv_heads, >pos, head_dim]."""
        torch, s, F = self.torch, self.shape, self.F
        B, group = tokens.shape[0], s.heads // s.kv_heads
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        for layer, p in enumerate(self.layers):
            qkv = F.linear(self._rms(x, p["ln1"]), p["wqkv"])
            q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
            q = self._rope(q.view(B, s.heads, s.head_dim), cos, sin, torch)
            k = self._rope(k.view(B, s.kv_heads, s.head_dim), cos, sin, torch)
            kc[layer][:, :, pos] = k
            vc[layer][:, :, pos] = v.view(B, s.kv_heads, s.head_dim)
            # Grouped-query decode as a 'group'-row query per KV head: each KV head's cache is read once.
            o = self._sdpa(q.view(B, s.kv_heads, group, s.head_dim), kc[layer][:, :, : pos + 1],
                           vc[layer][:, :, : pos + 1], causal=False)
            x = x + F.linear(o.reshape(B, s.heads * s.head_dim), p["wo"])
            x = self._mlp(x, p)
        out = F.linear(self._rms(x, self.norm), self.lm_head)
        return out if logits else out.argmax(-1)

    def prefill(self, tokens: Any, kc: list[Any], vc: list[Any], logits: bool = False) -> Any:
        """Prefill n prompts of L tokens (tokens [n, L]); writes their KV, returns the next token of each."""
        torch, s, F = self.torch, self.shape, self.F
        n, L = tokens.shape
        group = s.heads // s.kv_heads
        x = F.embedding(tokens.reshape(-1), self.embed)
        cos, sin = self.cos[:L].view(1, L, 1, -1), self.sin[:L].view(1, L, 1, -1)
        for layer, p in enumerate(self.layers):
            qkv = F.linear(self._rms(x, p["ln1"]), p["wqkv"])
            q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
            q = self._rope(q.view(n, L, s.heads, s.head_dim), cos, sin, torch).transpose(1, 2)
            k = self._rope(k.view(n, L, s.kv_heads, s.head_dim), cos, sin, torch).transpose(1, 2)
            v = v.view(n, L, s.kv_heads, s.head_dim).transpose(1, 2)
            kc[layer][:, :, :L] = k
            vc[layer][:, :, :L] = v
            # Expand KV heads to query heads (query head h uses KV head h // group), as Llama's repeat_kv does.
            ke = k[:, :, None].expand(n, s.kv_heads, group, L, s.head_dim).reshape(n, s.heads, L, s.head_dim)
            ve = v[:, :, None].expand(n, s.kv_heads, group, L, s.head_dim).reshape(n, s.heads, L, s.head_dim)
            o = self._sdpa(q, ke, ve, causal=True)
            x = x + F.linear(o.transpose(1, 2).reshape(n * L, s.heads * s.head_dim), p["wo"])
            x = self._mlp(x, p)
        last = x.view(n, L, s.hidden)[:, -1]
        out = F.linear(self._rms(last, self.norm), self.lm_head)
        return out if logits else out.argmax(-1)


def kv_views(pool: Any, shape: ModelShape, batch: int, cap: int) -> tuple[list[Any], list[Any]]:
    """Per-layer K and V caches [batch, kv_heads, cap, head_dim] carved from one flat bf16 pool."""
    per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim
    need = per_token * batch * cap
    if need > pool.numel():
        raise ValueError(f"KV pool too small for batch {batch} x {cap} tokens")
    v = pool[:need].view(shape.layers, 2, batch, shape.kv_heads, cap, shape.head_dim)
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


def pick_attention(torch: Any, clock: Clock, q: Any, k: Any, v: Any, causal: bool,
                   allow_math: bool) -> tuple[Any, dict[str, float | None]]:
    """Time every scaled_dot_product_attention backend on this shape; return the fastest and all times."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"] + (["MATH"] if allow_math else [])
    times: dict[str, float | None] = {}
    for name in names:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                times[name] = clock.time(fn, 2, 10)["median_s"]
        except RuntimeError:  # the backend refuses this shape or dtype
            times[name] = None
    ok = {n: t for n, t in times.items() if t is not None}
    if not ok:
        return None, times
    best = min(ok, key=ok.__getitem__)
    return [getattr(SDPBackend, best)], times


# ------------------------------------------------------------------------------------------------- measuring


def default_grids(tiny: bool) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(prefill (n prompts, length) points, decode (batch, context) points)."""
    if tiny:
        return [(1, 32), (1, 128), (4, 64)], [(1, 32), (4, 128), (8, 256)]
    prefill = [(1, L) for L in (128, 256, 512, 1024, 2048, 4096, 8192)]
    prefill += [(64, 128), (16, 512), (8, 1024), (4, 2048), (2, 4096)]  # 8192-token chunks of shorter prompts
    batches = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
    contexts = (128, 512, 1024, 2048, 4096, 8192)
    decode = [(b, c) for b in batches for c in contexts]
    return prefill, decode


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
        "schema": 1,
        "command": "python3 -m backends.sim.calibrate " + " ".join(args.argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": asdict(shape) | {"kv_bytes_per_token": shape.kv_bytes_per_token,
                                  "weight_read_bytes": shape.weight_read_bytes,
                                  "total_weight_bytes": shape.total_weight_bytes},
        "method": {"kv_cache": "contiguous per sequence", "dtype": "bfloat16",
                   "attention": "scaled_dot_product_attention, fastest backend per shape",
                   "decode_attention": "grouped-query as a (heads/kv_heads)-row query per KV head"},
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
    del src, dst
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
    del mats, out
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
        toks = torch.randint(0, shape.vocab, (1, args.max_num_batched_tokens), device="cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logits = model.prefill(toks, kc, vc, logits=True)
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

    prefill_grid, decode_grid = default_grids(args.tiny)
    if args.quick:
        prefill_grid, decode_grid = prefill_grid[:3:2], [(1, 1024), (64, 1024)]
    doc["prefill"], doc["decode"] = [], []

    def record_point(kind: str, n: int, length: int, eager: dict[str, float], graph: dict[str, float] | None,
                     attn: tuple[Any, dict[str, float | None]], extra: dict[str, Any]) -> None:
        cost = step_cost(shape, kind, n, length)
        tokens = n if kind == "decode" else n * length
        pt = {"kind": kind, "n": n, "length": length, "scheduled_tokens": tokens,
              # each decoding request's context includes the token being computed (backends/sim/profile.py)
              "attended_kv_tokens": n * (length + 1) if kind == "decode" else 0,
              "t_eager_s": eager["median_s"], "t_graph_s": graph["median_s"] if graph else None,
              "t_roofline_s": roofline_s(cost, hbm, rate), "bytes": cost["bytes"], "flops": cost["flops"],
              "attn_backend": attn[0][0].name if attn[0] else "default", "attn_times_s": attn[1]} | extra
        doc[kind].append(pt)
        g = f"{pt['t_graph_s'] * 1e3:8.2f}" if graph else "     n/a"
        print(f"{kind:7s} n={n:4d} len={length:5d} eager {pt['t_eager_s'] * 1e3:8.2f} ms graph {g} ms "
              f"roofline {pt['t_roofline_s'] * 1e3:8.2f} ms attn {pt['attn_backend']}", flush=True)

    def run_point(kind: str, n: int, length: int, step: Callable[[], Any], attn: Any) -> None:
        model.attn_backend = attn[0]
        eager = clock.time(step, 1, 3 if kind == "prefill" else 5)
        graph, extra = None, {}
        if cuda and not args.no_graphs:
            for backend in (attn[0], None):  # retry with torch's own attention choice if capture fails
                model.attn_backend = backend
                try:
                    g = capture_graph(torch, step)
                    graph = clock.time(g.replay, 3, 10 if kind == "prefill" else 30)
                    del g
                    break
                except RuntimeError as exc:  # keep the eager number; say why the graph is missing
                    extra["graph_error"] = str(exc)[:300]
                    torch.cuda.synchronize()
            if graph is not None and model.attn_backend is None and attn[0] is not None:
                extra["graph_attn_backend"] = "default"
        record_point(kind, n, length, eager, graph, attn, extra)
        model.attn_backend = None

    # 3. Prefill sweep.
    s = shape
    for n, L in prefill_grid:
        if n * L > pool_tokens or L > s.max_model_len or left() < 60:
            doc["skipped"].append({"kind": "prefill", "n": n, "length": L})
            continue
        kc, vc = kv_views(pool, s, n, L)
        toks = torch.randint(0, s.vocab, (n, L), device=args.device)
        q = torch.randn(n, s.heads, L, s.head_dim, device=args.device, dtype=torch.bfloat16)
        kx = torch.randn(n, s.heads, L, s.head_dim, device=args.device, dtype=torch.bfloat16)
        attn = pick_attention(torch, clock, q, kx, kx, True, allow_math=L <= 2048) if cuda else (None, {})
        del q, kx
        run_point("prefill", n, L, lambda: model.prefill(toks, kc, vc), attn)
        if cuda:
            torch.cuda.empty_cache()
    rec.save()

    # 4. Decode sweep (the first point also checks the logits are finite and graph == eager).
    for B, C in decode_grid:
        if B * (C + 1) > pool_tokens or C + 1 > s.max_model_len + 1 or left() < 45:
            doc["skipped"].append({"kind": "decode", "n": B, "length": C})
            continue
        kc, vc = kv_views(pool, s, B, C + 1)
        toks = torch.randint(0, s.vocab, (B,), device=args.device)
        q = torch.randn(B, s.kv_heads, s.heads // s.kv_heads, s.head_dim, device=args.device, dtype=torch.bfloat16)
        attn = pick_attention(torch, clock, q, kc[0][:, :, : C + 1], vc[0][:, :, : C + 1], False,
                              allow_math=True) if cuda else (None, {})
        del q
        if not doc["decode"]:
            doc["decode_logits_finite"] = bool(torch.isfinite(model.decode(toks, C, kc, vc, logits=True)).all())
        run_point("decode", B, C, lambda: model.decode(toks, C, kc, vc), attn)
    rec.save()

    # 5. KV block copies alone and while a decode step / a prefill runs on the main stream.
    if cuda and not args.no_copies and left() > 40:
        doc["copy"] = measure_copies(torch, model, pool, shape, args)
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
    g = capture_graph(torch, lambda: model.decode(toks, C, kc, vc))
    out["with_decode"] = oc.measure_copies_with(torch, gate, blocks, rng, streams, g.replay,
                                                f"decode B={B} C={C} (graph)", n_dev // 2, 2)
    del g
    L = 2048
    kc, vc = kv_views(pool, shape, 1, L)
    toks = torch.randint(0, shape.vocab, (1, L), device="cuda")
    g = capture_graph(torch, lambda: model.prefill(toks, kc, vc))
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

    X = np.array([[1.0, p["scheduled_tokens"] if p["kind"] == "decode" else 0.0,
                   p["scheduled_tokens"] if p["kind"] == "prefill" else 0.0, p["attended_kv_tokens"]]
                  for p in points])
    y = np.array([p[key] for p in points])
    scale = np.array([1e-3, 1e-5, 1e-5, 1e-8])
    coef = _lstsq_nonneg((X * scale) / y[:, None], np.ones(len(y))) * scale
    return {"base_s": float(coef[0]), "per_decode_token_s": float(coef[1]), "per_prefill_token_s": float(coef[2]),
            "per_kv_token_s": float(coef[3])} | _errors(X @ coef, y)


def fit_max(points: list[Point], key: str) -> dict[str, Any]:
    """Fit t = max(base, per_token * tokens) + per_kv * kv_tokens (a roofline-shaped candidate) by grid search."""
    import numpy as np

    tok = np.array([float(p["scheduled_tokens"]) for p in points])
    kv = np.array([float(p["attended_kv_tokens"]) for p in points])
    y = np.array([p[key] for p in points])
    small = y[tok <= 8]
    base_grid = np.linspace(0.5, 1.5, 201) * (small.min() if len(small) else y.min())
    pt_grid = np.geomspace(1e-6, 1e-4, 401)
    best: tuple[float, float, float, float] | None = None
    for b0 in base_grid:
        lin = np.maximum(b0, np.outer(pt_grid, tok))  # [grid, points]
        r = (y - lin) / y  # relative residual before the KV term
        a = kv / y
        denom = float(a @ a)
        per_kv = np.clip((r @ a) / denom, 0, None) if denom > 0 else np.zeros(len(pt_grid))
        err = ((lin + np.outer(per_kv, kv)) - y) / y
        sse = (err**2).sum(axis=1)
        i = int(sse.argmin())
        if best is None or sse[i] < best[0]:
            best = (float(sse[i]), float(b0), float(pt_grid[i]), float(per_kv[i]))
    assert best is not None
    _, b0, pt, pkv = best
    pred = np.maximum(b0, pt * tok) + pkv * kv
    return {"base_s": b0, "per_token_s": pt, "per_kv_token_s": pkv} | _errors(pred, y)


def _errors(pred: Any, y: Any) -> dict[str, Any]:
    import numpy as np

    rel = (pred - y) / y
    return {"max_rel_err": float(np.abs(rel).max()), "rms_rel_err": float(np.sqrt((rel**2).mean())),
            "n_points": int(len(y)), "predicted_s": [float(v) for v in pred]}


def linear_predict(step: dict[str, float], tokens: int, kv: int) -> float:
    return step["base_s"] + step["per_token_s"] * tokens + step["per_kv_token_s"] * kv


# The benchmark's operating range (docs/calibration.md): decode batches up to max_num_seqs with contexts up to
# 4096, and prefill chunks of 1024..8192 tokens (the chunked-prefill budget).
OPERATING_RANGE = {"decode_max_context": 4096, "prefill_min_tokens": 1024, "prefill_max_tokens": 8192}


def in_range(p: Point, rng: dict[str, int]) -> bool:
    if p["kind"] == "decode":
        return p["length"] <= rng["decode_max_context"]
    return rng["prefill_min_tokens"] <= p["scheduled_tokens"] <= rng["prefill_max_tokens"]


def select_points(doc: dict[str, Any], key: str, rng: dict[str, int] | None) -> list[Point]:
    pts = [p for p in doc["prefill"] + doc["decode"] if p.get(key) is not None]
    return [p for p in pts if rng is None or in_range(p, rng)]


def fit_all(doc: dict[str, Any]) -> dict[str, Any]:
    """Every candidate fit (data source x range x cost-model form), for the report."""
    out: dict[str, Any] = {}
    for key in ("t_graph_s", "t_eager_s", "t_roofline_s"):
        for rname, rng in (("all", None), ("operating", OPERATING_RANGE)):
            pts = select_points(doc, key, rng)
            if len(pts) < 4:
                continue
            for form, fn in (("linear", fit_linear), ("split", fit_split), ("max", fit_max)):
                r = fn(pts, key)
                r.pop("predicted_s")
                out[f"{key}/{rname}/{form}"] = r
    return out


# --------------------------------------------------------------------------------------------- profile writing


def write_profile(doc: dict[str, Any], raw_path: str, profile_path: str, key: str, rng: dict[str, int],
                  host_tokens: int, util: float, fit_command: str) -> dict[str, Any]:
    shape = doc["model"]
    pts = select_points(doc, key, rng)
    fit = fit_linear(pts, key)
    step = {k: fit[k] for k in ("base_s", "per_token_s", "per_kv_token_s")}
    env = doc["env"]
    smi = [x.strip() for x in env.get("nvidia_smi", "").split(",")]
    card = smi[0] if smi and smi[0] else env.get("device", "?")
    driver = smi[1] if len(smi) > 1 else "?"
    cap = doc.get("kv_capacity", {})
    device_tokens = cap.get(f"kv_tokens_at_{util}", 0)
    copy = doc.get("copy", {}).get("with_decode", {})
    d2h = copy.get("d2h", {}).get("copy_gb_per_s_with_compute", {}).get("d2h", 0.0) * 1e9
    h2d = copy.get("h2d", {}).get("copy_gb_per_s_with_compute", {}).get("h2d", 0.0) * 1e9
    worst = max(pts, key=lambda p: abs(linear_predict(step, p["scheduled_tokens"], p["attended_kv_tokens"])
                                       / p[key] - 1))
    data = {"t_graph_s": "CUDA-graph replay of the forward (cuBLAS GEMMs, fastest SDPA attention kernel)",
            "t_eager_s": "eager forward", "t_roofline_s": "roofline (measured HBM bandwidth and matmul rate)"}[key]
    rows = [[p["kind"], p["n"], p["length"], p["scheduled_tokens"], p["attended_kv_tokens"], round(p[key], 6),
             round(linear_predict(step, p["scheduled_tokens"], p["attended_kv_tokens"]), 6)] for p in pts]
    gib = 1 << 30
    text = f"""# Hardware profile for the simulated engine: Llama3-8B (bf16) on one {card}.
# MEASURED (docs/calibration.md): {card}, driver {driver}, torch {env.get('torch')} (CUDA {env.get('cuda')}),
# {doc.get('started_utc')}. Measured with
#   {doc['command']}
# and fitted with
#   {fit_command}
# Step time model: t_step = base_s + per_token_s * scheduled_tokens + per_kv_token_s * attended_kv_tokens,
# least squares on relative error over {fit['n_points']} measured steps ({data});
# max error {100 * fit['max_rel_err']:.1f}% (worst: {worst['kind']} n={worst['n']} len={worst['length']}),
# rms {100 * fit['rms_rel_err']:.1f}%. Range fitted and checked: decode contexts <= {rng['decode_max_context']}, batch 1..256;
# prefill steps of {rng['prefill_min_tokens']}..{rng['prefill_max_tokens']} tokens.
name: h100-llama3-8b
description: Llama3-8B bf16 on one H100 80GB HBM3; cost model fitted to measured CUDA-graph forwards
source: measured
model:
  name: llama3-8b
  kv_bytes_per_token: {shape['kv_bytes_per_token']}      # 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes
  max_model_len: {shape['max_model_len']}
step:
  base_s: {step['base_s']:.4e}
  per_token_s: {step['per_token_s']:.4e}
  per_kv_token_s: {step['per_kv_token_s']:.4e}
batch:
  max_num_seqs: 256
  max_num_batched_tokens: 8192     # chunked-prefill token budget per step
  block_size: 16
kv:
  # vLLM's sizing at gpu-memory-utilization {util}: {util} x {cap.get('total_bytes', 0) / gib:.2f} GiB
  # - weights {cap.get('weights_bytes', 0) / gib:.2f} GiB - activation peak {cap.get('activation_peak_bytes', 0) / gib:.2f} GiB
  # - other {cap.get('non_torch_bytes', 0) / gib:.2f} GiB, over 128 KiB a token (rounded to 16-token blocks).
  device_tokens: {device_tokens}
  host_tokens: {host_tokens}            # {host_tokens * shape['kv_bytes_per_token'] / gib:.0f} GiB of pinned host memory for KV
transfer:
  # 2 MiB KV blocks between device and pinned host on a side stream while a decode step runs (measured).
  h2d_bytes_per_s: {h2d:.3e}
  d2h_bytes_per_s: {d2h:.3e}
measurements:
  raw: {raw_path}
  card: "{card}"
  driver: "{driver}"
  torch: "{env.get('torch')}"
  data: {key}
  fit_range: {json.dumps(rng)}
  fit_max_rel_err: {fit['max_rel_err']:.4f}
  fit_rms_rel_err: {fit['rms_rel_err']:.4f}
  # kind, n (sequences), length (context or prompt), scheduled_tokens, attended_kv_tokens, measured_s, predicted_s
  points:
"""
    text += "".join(f"  - {json.dumps(r)}\n" for r in rows)
    with open(profile_path, "w") as fh:
        fh.write(text)
    return fit


# -------------------------------------------------------------------------------------------------------- CLI


def print_tables(doc: dict[str, Any]) -> None:
    c = doc.get("ceilings", {})
    if c:
        print(f"HBM copy {c['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s; matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    if "kv_capacity" in doc:
        k = doc["kv_capacity"]
        print(f"KV tokens at 0.9: {k['kv_tokens_at_0.9']}, at 0.3: {k['kv_tokens_at_0.3']} "
              f"(activation peak {k['activation_peak_bytes'] / 2**30:.2f} GiB)")
    for name, r in sorted(fit_all(doc).items()):
        coefs = " ".join(f"{k}={v:.3e}" for k, v in r.items() if k.endswith("_s"))
        print(f"fit {name:32s} max {100 * r['max_rel_err']:6.1f}% rms {100 * r['rms_rel_err']:5.1f}% n={r['n_points']:3d} {coefs}")
    for where in ("with_decode", "with_prefill"):
        r = doc.get("copy", {}).get(where)
        if not r:
            continue
        for kind in ("d2h", "h2d", "bidir"):
            s = r[kind]
            print(f"copy {where:12s} {kind:5s} alone {s['copy_gb_per_s_alone']} with {s['copy_gb_per_s_with_compute']}"
                  f" step slowdown {s['compute_slowdown_pct']:.1f}% overlap {s['overlap_fraction']:.2f}")


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
    args = ap.parse_args(argv)
    args.argv = argv
    if args.cmd == "measure":
        doc = measure(args)
        print_tables(doc)
        return 0
    with open(args.raw) as fh:
        doc = json.load(fh)
    print_tables(doc)
    if args.profile:
        fit = write_profile(doc, args.raw, args.profile, args.data, OPERATING_RANGE, args.host_tokens, args.util,
                            "python3 -m backends.sim.calibrate " + " ".join(argv))
        print(f"wrote {args.profile}: max error {100 * fit['max_rel_err']:.1f}% over {fit['n_points']} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
