"""The non-attention time of a model on this CPU, measured: what a plan cannot speed up.

The roofline guess (search.py `other_time`: 2 x matrix parameters x tokens GEMM FLOPs at peak)
leaves out residual adds, copies, LayerNorm, GELU, patch convs: on the planted-local benchmarks
(--threads 1) it gave a non-attention share of 0.077 (Wan-style) / 0.10 (Flux-style) where the
forward with its attention replaced by a no-op measures 0.15 / 0.13, and the plan over-predicted
the end-to-end speedup by up to 1.47x. For the cpu target (the machine we run on) the planner
times, in `ROUNDS` alternating rounds after a warm-up, one forward of the exported graph on the
example inputs and one of the same graph with every site's output replaced by a zero tensor of
its shape (`attention_free`: q, k and v are still computed; the scores, the mask
building and the attention itself are gone). The share outside attention is (fastest
attention-free forward) / (fastest forward) over the rounds: load on a shared machine only ever adds
time, so each fastest run is the one least disturbed. (The median of per-round ratios was used
before: with two OpenMP threads on two oversubscribed cores a round's two runs do not see the same
load, and the median came out at the clamp, 1.0 — no attention at all — under a parallel test run.)
With one torch thread the times are the thread's CPU time (steadier there: time spent descheduled
does not count).

Why not the forward minus the sites' exact kernels timed alone: inside the model attention costs
more than alone (strided q/k/v, caches holding the activations): on the Wan-style model that
subtraction left 0.25 of the forward outside attention where the no-op measures 0.15.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from attnopt.frontends.fx_state import preserved
from attnopt.ir import Site

ROUNDS = 3


def _absent(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *inputs: Any) -> torch.Tensor:
    """A site's output left uncomputed; its inputs are taken so that what produces them stays.
    Zeros, not torch.empty: uninitialized memory can hold denormals and NaNs, which made the
    elementwise work after the site slower than on real values (a GELU stack measured the
    attention-free forward as slow as the full one on a quiet host: share 1.0 for a model whose
    attention is a few % of its time); a memset costs little beside what it stands in for."""
    return torch.zeros(shape, dtype=dtype, device=device)


def attention_free(gm: fx.GraphModule, sites: Sequence[Site]) -> fx.GraphModule | None:
    """A copy of gm whose sites' outputs are zero tensors of their shapes (q, k, v kept
    as inputs of the stand-in, the rest of each site dead and removed), or None when a site's
    output node or its shape is not found."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    for s in sites:
        out = nodes.get(s.output)
        val = None if out is None else out.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
            return None
        deps = tuple(nodes[n] for n in (s.q, s.k, s.v) if n in nodes)
        with graph.inserting_after(out):
            stand_in = graph.call_function(_absent, (tuple(val.shape), val.dtype, val.device, *deps))
        out.replace_all_uses_with(stand_in)
        inside = set(s.nodes) | {s.output}
        for n in reversed(list(graph.nodes)):  # fx keeps ops it deems impure (SDPA: dropout)
            if n.name in inside and not n.users:
                graph.erase_node(n)
    new = fx.GraphModule(gm, graph)
    new.graph.eliminate_dead_code()  # needs the owning module for its purity checks
    new.recompile()
    return new


def other_share(gm: fx.GraphModule, inputs: Sequence[Any], sites: Sequence[Site],
                rounds: int = ROUNDS) -> float | None:
    """The measured share of one forward of `gm` on `inputs` spent outside the attention sites
    (see the module header), or None when it cannot be measured (no attention-free copy, a run
    fails)."""
    free = attention_free(gm, sites)
    if free is None:
        return None

    # the graph modules themselves, not an interpreter (~10 us a node more): an exported
    # program's module takes its inputs in their pytree structure, the flat ones are its leaves
    in_spec = getattr(gm, "_in_spec", None)
    args, kwargs = (list(inputs), {}) if in_spec is None else \
        torch.utils._pytree.tree_unflatten(list(inputs), in_spec)

    def run(m: fx.GraphModule) -> None:  # in-place writes put back
        with torch.no_grad(), preserved(gm, inputs):
            m(*args, **kwargs)

    # with one torch thread, this thread's CPU time: time spent descheduled on a shared machine
    # does not count (with more, CPU time would count OpenMP's spin-waiting)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    try:
        run(gm), run(free)  # warm-up
        full_t, free_t = [], []
        for _ in range(rounds):  # alternating, so both see the same stretch of the machine's load
            t0 = clock()
            run(gm)
            t1 = clock()
            run(free)
            t2 = clock()
            full_t.append(t1 - t0)
            free_t.append(t2 - t1)
    except (ValueError, RuntimeError, NotImplementedError, TypeError):
        return None
    full, other = min(full_t), min(free_t)
    return min(1.0, other / full) if full > 0 else 0.0
