"""Per-head choices: each head's error under a candidate, and the head subsets worth trying.

A candidate whose end-to-end error alone exceeds the budget is also tried on a subset of its
site's heads (the rest keep the exact kernel). Heads differ (some attend locally, some far
away), so a layout too coarse for a whole site can still pay on the heads it suits: heads
(whole KV groups under GQA) are ranked by their own error, and the best quarter, half and three
quarters become candidates of their own.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from attnopt.planner.metrics import compared

HEAD_SHARES = (0.25, 0.5, 0.75)  # per-head candidates: these shares of a site's heads


def head_errors(ref: torch.Tensor, new: torch.Tensor, out_perm: Sequence[int],
                valid: torch.Tensor | None) -> np.ndarray:
    """Relative L2 per head of a site output (canonical [B, H, Sq, Dv] after undoing out_perm),
    at real-token query rows when `valid` [B, Sq] is known; NaN/Inf as in metrics.compared."""
    inv = [0] * len(out_perm)
    for i, p in enumerate(out_perm):
        inv[p] = i
    a = ref.detach().double().permute(inv)
    b = new.detach().double().permute(inv)
    if a.shape != b.shape:
        return np.full(a.shape[1], np.inf)
    unbounded, ok = compared(a, b)
    if valid is not None and tuple(valid.shape) == (a.shape[0], a.shape[2]):
        keep = valid.to(a.device)[:, None, :, None].expand_as(a)  # padded query rows: ignored
        unbounded, ok = unbounded & keep, ok & keep
    # a head whose output is NaN/Inf where the reference is not: infinite error (nan_to_num
    # used to zero it, ranking a NaN head best)
    bad_head = unbounded.transpose(0, 1).reshape(a.shape[1], -1).any(dim=1)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    a, b = torch.where(ok, a, zero), torch.where(ok, b, zero)
    num = (a - b).transpose(0, 1).reshape(a.shape[1], -1).norm(dim=1)
    den = a.transpose(0, 1).reshape(a.shape[1], -1).norm(dim=1).clamp_min(1e-12)
    err = (num / den).masked_fill(bad_head, math.inf)
    return err.masked_fill(torch.isnan(err), math.inf).cpu().numpy()


def head_subsets(errors: np.ndarray, num_kv_heads: int,
                 shares: Sequence[float] = HEAD_SHARES) -> list[tuple[int, ...]]:
    """Head subsets to try: the lowest-error `share` of the heads, whole KV groups at a time
    (a group's error is its worst head's), each subset a proper, non-empty one."""
    H = len(errors)
    if num_kv_heads <= 0 or H % num_kv_heads:
        return []
    g = H // num_kv_heads
    group_err = errors.reshape(num_kv_heads, g).max(axis=1)
    order = np.argsort(group_err, kind="stable")
    out: list[tuple[int, ...]] = []
    for share in shares:
        n = int(round(num_kv_heads * share))
        if not 0 < n < num_kv_heads:
            continue
        sub = tuple(sorted(int(grp) * g + j for grp in order[:n] for j in range(g)))
        if sub not in out:
            out.append(sub)
    return out
