"""The non-attention time of a model on this CPU, measured: what a plan cannot speed up.

The roofline guess (search.py `other_time`: 2 x matrix parameters x tokens GEMM FLOPs at peak)
leaves out residual adds, copies, LayerNorm, GELU, patch convs: on the planted-local benchmarks
it predicted a non-attention share of 0.077 (Wan-style) / 0.10 (Flux-style) where the measured
one was 0.17 / 0.21, and so over-predicted the end-to-end speedup by up to 1.47x. For the cpu
target (the machine we run on) the planner instead times, in `ROUNDS` alternating rounds after a
warm-up, one forward of the exported graph on the example inputs and each site's exact kernel
(timing.py's op call, random q/k/v of the site's sizes; sites of the same sizes timed once and
counted once per site). The share of the forward outside attention is the median over the rounds
of (forward - attention) / forward; a round's two measurements see about the same load on a
shared machine, their absolute times do not. With one torch thread the times are the thread's CPU
time (steadier there: time spent descheduled does not count).

Limits: the site's mask tensor is not reproduced (as in timing.py), and a site written as
matmul / softmax / matmul costs the model more than its exact kernel: the difference counts as
non-attention time, so the prediction is then low (on the safe side).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch

from attnopt.cost.roofline import resolve_dims
from attnopt.frontends.fx_state import preserved
from attnopt.ir import AttentionSpec

ROUNDS = 3


def _site_inputs(spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = resolve_dims(spec)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(d["batch"], d["num_heads"], d["q_len"], d["head_dim"], generator=g)
    k = torch.randn(d["batch"], d["num_kv_heads"], d["kv_len"], d["head_dim"], generator=g)
    v = torch.randn(d["batch"], d["num_kv_heads"], d["kv_len"], d["v_head_dim"], generator=g)
    return q, k, v


def other_share(gm: Any, inputs: Sequence[Any], specs: Sequence[AttentionSpec],
                rounds: int = ROUNDS) -> float | None:
    """The measured share of one forward of `gm` on `inputs` spent outside the attention sites
    `specs` (see the module header), or None when it cannot be measured (a kernel refuses the
    sizes, the forward fails)."""
    from attnopt.codegen.ops import attention_op

    # the graph module itself, not an interpreter (~10 us a node more): an exported program's
    # module takes its inputs in their pytree structure, the flat ones are its leaves
    in_spec = getattr(gm, "_in_spec", None)
    args, kwargs = (list(inputs), {}) if in_spec is None else \
        torch.utils._pytree.tree_unflatten(list(inputs), in_spec)

    def forward() -> None:  # in-place writes put back
        with torch.no_grad(), preserved(gm, inputs):
            gm(*args, **kwargs)

    groups: dict[Any, list] = {}
    for spec in specs:
        key = (tuple(resolve_dims(spec).items()), spec.mask.kind, spec.mask.alignment)
        if key in groups:
            groups[key][1] += 1
            continue
        causal, align = spec.mask.kind == "causal", spec.mask.alignment
        scale = float(spec.scale) if spec.scale is not None else resolve_dims(spec)["head_dim"] ** -0.5
        call = (lambda q, k, v, c=causal, a=align, s=scale:
                attention_op(q, k, v, scale=s, causal=c, causal_alignment=a))
        groups[key] = [(call, _site_inputs(spec)), 1]
    try:
        forward()  # warm-up
        with torch.no_grad():
            for (call, qkv), _n in groups.values():
                call(*qkv)
        # with one torch thread, this thread's CPU time: time spent descheduled on a shared
        # machine does not count (with more, CPU time would count OpenMP's spin-waiting)
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        shares = []
        for _ in range(rounds):
            t0 = clock()
            forward()
            fwd = clock() - t0
            att = 0.0
            with torch.no_grad():
                for (call, qkv), n in groups.values():
                    t0 = clock()
                    call(*qkv)
                    att += n * (clock() - t0)
            shares.append(max(0.0, fwd - att) / fwd if fwd > 0 else 0.0)
    except (ValueError, RuntimeError, NotImplementedError):
        return None
    return statistics.median(shares)
