"""How far a candidate's outputs are from the reference: relative L2 and cosine, real tokens only.

NaN and Inf are infinite error wherever the planner scores (`rel_l2`, `cosine`, and the per-head
`heads.head_errors`): a candidate output that is non-finite where the reference is finite, or
differs from a non-finite reference value, is an unbounded error (`max(0.0, nan)` is 0.0, so a
NaN-producing candidate used to score as error-free). Positions where the reference itself is
NaN (a fully masked query row: 0/0 in the original) are undefined output, as in validation
(pipeline/validate.py): matching NaN there is equal, and so is the zero attnopt's exact kernels
put there; +-Inf in the reference must be matched exactly.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch


def worst(a: float, b: float) -> float:
    """max() for errors that treats NaN as the worst value (max(0.0, nan) is 0.0)."""
    return math.inf if math.isnan(a) or math.isnan(b) else max(a, b)


def valid_rows(batch: Sequence[Any], padding_positions: Sequence[int]) -> torch.Tensor | None:
    """Real-token positions [B, S] of a batch, from its first key-padding input in the HF
    convention (integer/float, nonzero = real token), or None. Outputs at padded positions are
    meaningless to users (they pool with the same mask) yet an approximation moves them most:
    a padded query whose local window holds only padding keys sees nothing at all. Boolean masks
    are left alone (libraries disagree on whether True means keep or pad)."""
    for i in padding_positions:
        t = batch[i] if i < len(batch) else None
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype != torch.bool:
            return t != 0
    return None


def _floats(x: Any, valid: torch.Tensor | None = None) -> torch.Tensor:
    flat, _ = torch.utils._pytree.tree_flatten(x)
    ts = []
    for t in flat:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        if valid is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(valid.shape):
            t = t[valid.to(t.device)]  # [B, S, ...] outputs: real tokens only
        ts.append(t.detach().double().reshape(-1))
    return torch.cat(ts) if ts else torch.zeros(1, dtype=torch.float64)


def compared(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unbounded, compared) masks of a reference `a` and a candidate `b` of one shape.

    unbounded: positions whose error is infinite: `b` non-finite where `a` is finite, or `a`
    +-Inf and `b` not the same infinity. compared: positions where both are finite. The rest
    are equal: `a` NaN (undefined output: a fully masked query row of the original; `b` NaN
    there too, or the zero attnopt's exact kernels put there, like validation), or `a` and
    `b` the same infinity."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    inf_a = torch.isinf(a)
    unbounded = (fa & ~fb) | (inf_a & (b != a))
    return unbounded, fa & fb


def rel_l2(ref: Any, new: Any, valid: torch.Tensor | None = None) -> float:
    """Relative L2 over every floating output (with `valid`: real-token rows of [B, S, ...] ones);
    inf when the candidate has NaN/Inf where the reference does not (see `compared`)."""
    a, b = _floats(ref, valid), _floats(new, valid)
    if a.shape != b.shape:
        return float("inf")
    unbounded, ok = compared(a, b)
    if bool(unbounded.any()):
        return float("inf")
    a, b = a[ok], b[ok]
    e = float((a - b).norm() / max(float(a.norm()), 1e-12))
    return math.inf if math.isnan(e) else e


def cosine(ref: Any, new: Any, valid: torch.Tensor | None = None) -> float:
    """Cosine similarity over every floating output; -1 (the worst) when the candidate has
    NaN/Inf where the reference does not (see `compared`)."""
    a, b = _floats(ref, valid), _floats(new, valid)
    if a.shape != b.shape:
        return 0.0
    unbounded, ok = compared(a, b)
    if bool(unbounded.any()):
        return -1.0
    a, b = a[ok], b[ok]
    c = float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))
    return -1.0 if math.isnan(c) else c
