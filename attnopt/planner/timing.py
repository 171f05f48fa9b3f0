"""Timing chosen kernels on this machine, so that a plan's predicted speedups stand beside
measured ones (`attnopt plan --time`, `attnopt.plan(..., time_kernels=True)`).

Only when the plan's target is this machine: a prediction for an H100 cannot be checked on a CPU.
Each site's chosen kernel and its own exact kernel (dense, causal or gqa_decode: the cost model's
baseline, `Candidate.baseline_time_s`) run through the ops a spliced model calls (codegen/ops.py
`attention_op`, codegen/gna_op.py `gna_attention_op`, per-head choices included) on random
q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] of the site's sizes, alternately for
`ROUNDS` rounds after one warm-up call each. The speedup is the median of the per-round ratios:
the two calls of a round see about the same load, where the times alone do not (on the shared
2-core machine, at load 8, one op's median time moved 1.7x between runs and its fastest 7x); the
times shown are the medians. A
choice that is the site's exact kernel itself is timed once (its measured speedup is 1 by
construction); sites with the same sizes and choice are timed once. The site's mask tensor, bias
and padding are not reproduced: the kernels' work is their structure (causal, window, layout),
which the choice carries.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from attnopt.cost.roofline import resolve_dims
from attnopt.cost.variants import Candidate
from attnopt.ir import AttentionSpec

ROUNDS = 9


@dataclass(frozen=True)
class Timed:
    """A site's kernels timed on this machine: the chosen one and the site's exact kernel."""

    time_s: float           # median over the rounds
    baseline_time_s: float  # the same for the site's exact kernel
    speedup: float          # median over the rounds of exact time / chosen time
    device: str

    def to_json(self) -> dict[str, Any]:
        return {"time_s": self.time_s, "baseline_time_s": self.baseline_time_s,
                "speedup": self.speedup, "device": self.device}

    @classmethod
    def from_json(cls, d: dict | None) -> "Timed | None":
        return None if d is None else cls(float(d["time_s"]), float(d["baseline_time_s"]),
                                          float(d["speedup"]), str(d["device"]))


def _scale(spec: AttentionSpec) -> float:
    return float(spec.scale) if spec.scale is not None else resolve_dims(spec)["head_dim"] ** -0.5


def _call(spec: AttentionSpec, c: Candidate) -> Callable[[Any, Any, Any], Any]:
    """The op call the spliced model makes for candidate `c` (codegen/ops.py, gna_op.py)."""
    from attnopt.codegen.gna_op import gna_attention_op
    from attnopt.codegen.ops import attention_op

    v, scale, align = c.variant, _scale(spec), spec.mask.alignment
    if v.layout is not None:
        return lambda q, k, vv: gna_attention_op(q, k, vv, None, scale=scale, layout=v.layout,
                                                 leading=c.leading, heads=c.heads, trailing=c.trailing)
    if c.window is not None:
        return lambda q, k, vv: attention_op(q, k, vv, scale=scale, window=tuple(c.window),
                                             causal_alignment=align)
    return _base_call(spec, v.family == "causal")


def _base_call(spec: AttentionSpec, causal: bool) -> Callable[[Any, Any, Any], Any]:
    from attnopt.codegen.ops import attention_op

    scale, align = _scale(spec), spec.mask.alignment
    return lambda q, k, v: attention_op(q, k, v, scale=scale, causal=causal, causal_alignment=align)


def _dtype(spec: AttentionSpec, device: str) -> torch.dtype:
    dt = getattr(torch, str(spec.dtype or "float32"), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        return torch.float32
    return torch.float32 if device == "cpu" and dt in (torch.float16, torch.bfloat16) else dt


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def time_choice(spec: AttentionSpec, c: Candidate, device: str, rounds: int = ROUNDS) -> Timed | None:
    """`c` and the site's exact kernel timed on `device` ("cpu" or "cuda"), or None when a
    kernel refuses the sizes."""
    fn = _call(spec, c)
    same = c.variant.layout is None and c.window is None  # the site's exact kernel itself
    d = resolve_dims(spec)
    dt = _dtype(spec, device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(d["batch"], d["num_heads"], d["q_len"], d["head_dim"], generator=g, device=device, dtype=dt)
    k = torch.randn(d["batch"], d["num_kv_heads"], d["kv_len"], d["head_dim"], generator=g, device=device, dtype=dt)
    v = torch.randn(d["batch"], d["num_kv_heads"], d["kv_len"], d["v_head_dim"], generator=g, device=device,
                    dtype=dt)
    base = _base_call(spec, spec.mask.kind == "causal")
    times: dict[str, list[float]] = {"c": [], "b": []}
    try:
        with torch.no_grad():
            for f in (fn, base):  # warm-up: kernel builds, caches
                f(q, k, v)
            _sync(device)
            for _ in range(rounds):
                for key, f in (("b", base),) if same else (("b", base), ("c", fn)):
                    t0 = time.perf_counter()
                    f(q, k, v)
                    _sync(device)
                    times[key].append(time.perf_counter() - t0)
    except (ValueError, RuntimeError, NotImplementedError):
        return None  # a kernel that refuses these sizes: no measurement rather than a wrong one
    b, ch = times["b"], times["b"] if same else times["c"]
    ratio = statistics.median(x / max(y, 1e-12) for x, y in zip(b, ch))
    return Timed(statistics.median(ch), statistics.median(b), ratio, device)


def time_sites(specs: dict[str, AttentionSpec], chosen: dict[str, Candidate], device: str,
               rounds: int = ROUNDS) -> dict[str, Timed]:
    """Timings of each site's chosen kernel (see the module header), one per distinct sizes and
    choice."""
    done: dict[Any, Timed | None] = {}
    out = {}
    for name, c in chosen.items():
        spec = specs[name]
        key = (tuple(resolve_dims(spec).items()), spec.scale, spec.mask.kind, spec.mask.alignment,
               c.variant, c.leading, c.trailing, c.window, c.heads)
        if key not in done:
            done[key] = time_choice(spec, c, device, rounds)
        if done[key] is not None:
            out[name] = done[key]
    return out
