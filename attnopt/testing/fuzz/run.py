"""Running a case and checking the fuzz invariant, independently of attnopt's own validator.

The case's program is optimized by attnopt, then the original and optimized programs are run
on fresh random inputs (padded masks and a fully masked query row included): a positive form
must produce a site and match (1e-4 relative for fp32, 1e-2 for fp16, measured against the
fp32 twin); a near miss marked `reject` must produce no site; one marked `either` may, but then
must match.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnopt.testing.fuzz.grammar import check_choices, expectation
from attnopt.testing.fuzz.onnx_case import onnx_feeds, onnx_model, ort_run
from attnopt.testing.fuzz.torch_case import torch_inputs, torch_module


class _Prop:
    """Record every node's value in meta['example_value'] (what dynamo leaves on a graph)."""

    @staticmethod
    def run(gm, inputs) -> None:
        import torch
        import torch.fx as fx

        class P(fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                n.meta["example_value"] = r
                return r
        with torch.no_grad():
            P(gm).run(*inputs)


@dataclass
class Outcome:
    ok: bool
    sites: int = 0
    rewritten: int = 0
    message: str = ""
    skipped: bool = False
    reverted: int = 0  # sites found, then left alone by attnopt's own validation


def max_rel(ref, got) -> float:
    import torch

    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    if len(ref) != len(got):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.double(), b.double()
        # NaN in the original (a query row with every key masked: 0/0) is undefined output;
        # attnopt's kernels return zeros there, like SDPA (the same rule as passes/validate.py).
        # NaN or Inf that the optimized program introduces where the original is finite, or an
        # Inf of the original that it does not reproduce, is a miscompile (inf - inf is NaN, and
        # max() would have dropped it).
        nan_a, inf_a = torch.isnan(a), torch.isinf(a)
        if bool(((torch.isfinite(a) & ~torch.isfinite(b)) | (inf_a & (b != a))).any()):
            return float("inf")
        same = nan_a | inf_a
        a, b = a.masked_fill(same, 0), b.masked_fill(same, 0)
        scale = max(a.abs().max().item() if a.numel() else 0.0, 1e-6)
        d = (a - b).abs().max().item() if a.numel() else 0.0
        r = d / scale
        worst = float("inf") if math.isnan(r) else max(worst, r)
    return worst


def _tol(c: dict[str, Any]) -> float:
    return 1e-2 if c["dtype"] == "float16" else 1e-4


def _site_expectation(c: dict[str, Any], report, res) -> Outcome | None:
    """A failure when the sites found contradict the grammar's expectation, else None."""
    n_sites, rew = len(report.sites), res.sites_rewritten
    exp = expectation(c)
    if res.sites_found != n_sites:
        return Outcome(False, n_sites, rew, f"inspect found {n_sites} sites, optimize {res.sites_found}")
    if exp == "site" and n_sites == 0:
        why = "; ".join(f"{r.node}: {r.reason}" for r in report.rejected)[:300]
        return Outcome(False, 0, 0, f"missed: a real attention form has no site ({why or 'no rejection'})")
    if exp == "reject" and n_sites:
        return Outcome(False, n_sites, rew, "near miss produced a site")
    return None


def run_torch(c: dict[str, Any]) -> Outcome:
    import torch

    import attnopt
    from attnopt.pipeline.optimize_torch import optimize_graph_module

    m = torch_module(c)
    inputs = torch_inputs(c, c["seed"] + 2)
    with torch.no_grad():
        try:
            m(*inputs)
        except Exception as e:  # noqa: BLE001 - the grammar made an invalid program
            return Outcome(False, message=f"generator: program does not run: {type(e).__name__}: {e}")
    fresh = [torch_inputs(c, c["seed"] + 3 + i) for i in range(2)] + [
        torch_inputs(c, c["seed"] + 9, pad=False), torch_inputs(c, c["seed"] + 10, empty_row=True)]
    if c["capture"] == "export":
        dyn = None
        if c["near"] == "dynamic_seq":
            sd = torch.export.Dim("seq", min=2, max=64)
            kseq = 3 if c["ktrans"] == "pretransposed" else 2
            dyn = [{2: sd}, {kseq: sd}, {2: sd}]
            dyn += [{1: sd} if a.dim() == 2 else {2: sd, 3: sd} for a in inputs[3:]]
            longer = dict(c, S=c["S"] + 3, Sk=c["S"] + 3)
            fresh += [torch_inputs(longer, c["seed"] + 11 + i) for i in range(2)]
        with torch.no_grad():
            ep = torch.export.export(m, tuple(inputs), dynamic_shapes=dyn, strict=False)
        gm, source = ep.module(), "aten"
    else:
        gm, source = torch.fx.symbolic_trace(m), "fx"
        _Prop.run(gm, inputs)
    report = attnopt.inspect(gm, inputs)
    new_gm, res = optimize_graph_module(gm, inputs, source=source)
    n_sites, rew = len(report.sites), res.sites_rewritten
    wrong = _site_expectation(c, report, res)
    if wrong is not None:
        return wrong
    reverted = sum(1 for s in res.sites if s.status == "reverted")
    # fp16: judged against the program's fp32 twin, as for ONNX (see run_onnx).
    twin = torch_module(dict(c, dtype="float32")) if c["dtype"] == "float16" else None
    worst = 0.0
    with torch.no_grad():
        for inp in fresh:
            ref = m(*inp)
            got = new_gm(*inp)
            if twin is None:
                worst = max(worst, max_rel(ref, got))
                continue
            truth = twin(*[x.float() if x.is_floating_point() else x for x in inp])
            worst = max(worst, max_rel(truth, got) - max_rel(truth, ref))
    if worst > _tol(c):
        return Outcome(False, n_sites, rew, f"miscompile: optimized output differs by {worst:.3g} "
                       f"(relative) on fresh inputs, tolerance {_tol(c):g}")
    return Outcome(True, n_sites, rew, reverted=reverted)


def run_onnx(c: dict[str, Any]) -> Outcome:
    import torch

    import attnopt

    model = onnx_model(c)
    report = attnopt.inspect(model)
    res = attnopt.optimize(model)
    n_sites, rew = len(report.sites), res.sites_rewritten
    wrong = _site_expectation(c, report, res)
    if wrong is not None:
        return wrong
    reverted = sum(1 for s in res.sites if s.status == "reverted")
    seqs = [None] + ([c["S"] + 3] if c["near"] == "dynamic_seq" and c["mask"] not in (
        "causal_where", "causal_add", "sliding", "bias") else [])
    # fp16: the original's own rounding is of the same size as the tolerance, so both programs
    # are measured against the fp32 twin of the program (same weights), and the optimized one
    # may not be worse than the original by more than the tolerance.
    twin = onnx_model(dict(c, dtype="float32")) if c["dtype"] == "float16" else None
    worst = 0.0
    for i, seq in enumerate(seqs):
        for j, pad in enumerate((True, True, False, True)):
            feeds = onnx_feeds(c, model, c["seed"] + 3 + 7 * i + j, pad=pad, seq=seq,
                               empty_row=j == 3)
            ref = [torch.from_numpy(x) for x in ort_run(model, feeds)]
            got = [torch.from_numpy(x) for x in ort_run(res.model, feeds)]
            if twin is None:
                worst = max(worst, max_rel(ref, got))
                continue
            feeds32 = {k: v.astype(np.float32) if v.dtype == np.float16 else v
                       for k, v in feeds.items()}
            truth = [torch.from_numpy(x) for x in ort_run(twin, feeds32)]
            worst = max(worst, max_rel(truth, got) - max_rel(truth, ref))
    if worst > _tol(c):
        return Outcome(False, n_sites, rew, f"miscompile: optimized output differs by {worst:.3g} "
                       f"(relative) in ONNX Runtime on fresh inputs, tolerance {_tol(c):g}")
    return Outcome(True, n_sites, rew, reverted=reverted)


def run_case(c: dict[str, Any]) -> Outcome:
    """Run one case; an exception inside attnopt is a failure, not a crash of the fuzzer.
    BadCase (raised, nothing run) for choices the grammar does not allow."""
    check_choices(c)
    try:
        return run_torch(c) if c["kind"] == "torch" else run_onnx(c)
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        return Outcome(False, message=f"crash: {type(e).__name__}: {str(e)[:300]} | {' / '.join(tb[-4:])[:500]}")
