"""Plain dense reference attention: the math every attnopt kernel must reproduce.

Canonical layouts (BHSD):
  q:         [B, H,   Sq,  D]
  k:         [B, Hkv, Skv, D]     H % Hkv == 0; q head h reads kv head h // (H // Hkv)
  v:         [B, Hkv, Skv, Dv]
  attn_mask: broadcastable to [B, H, Sq, Skv]; bool (True = attend) or float (added to the scores),
             exactly F.scaled_dot_product_attention's attn_mask semantics
  out:       [B, H,   Sq,  Dv]    dtype of q

Order of operations: scores = (q @ kᵀ) * scale -> softcap -> attn_mask -> causal / window -> normalizer
-> p @ v, all in float32 (float64 for float64 inputs: the ground truth the kernels and their
gradients are measured against). Differentiable in q, k, v and a float attn_mask.

Causal alignment: "top_left" keeps j <= i (torch SDPA's is_causal); "bottom_right" keeps
j <= i + (Skv - Sq) (the last query sees the last key: decoding with a KV cache). A window
(left, right) keeps -left <= j - i - offset <= right with the same offset (0 or Skv - Sq); None on a
side means unbounded.

Fully masked rows (every score -inf): softmax gives zeros, not NaN, matching
F.scaled_dot_product_attention in torch >= 2.5 on every backend (it uses a "safe" softmax). A decomposed
`softmax(...) @ v` in a model gives NaN there instead. Sigmoid gives zeros as masked entries contribute 0.
"""
from __future__ import annotations

import torch
from torch import Tensor
from attnopt.ir.vocab import CAUSAL_ALIGNMENTS, NORMALIZERS



def alignment_offset(q_len: int, kv_len: int, causal_alignment: str) -> int:
    """Column of the diagonal in row 0: 0 for top-left, Skv - Sq for bottom-right."""
    if causal_alignment == "top_left":
        return 0
    if causal_alignment == "bottom_right":
        return kv_len - q_len
    raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}")


def structural_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Bool [Sq, Skv] (True = attend) for causal and window limits, or None when nothing is limited."""
    offset = alignment_offset(q_len, kv_len, causal_alignment)
    left, right = window if window is not None else (None, None)
    if not causal and left is None and right is None:
        return None
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    rel = j - i - offset  # 0 on the aligned diagonal
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= rel <= 0
    if right is not None:
        allowed &= rel <= right
    if left is not None:
        allowed &= rel >= -left
    return allowed


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share heads and length")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    causal_alignment: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    normalizer: str = "softmax",
) -> Tensor:
    """Dense attention in float32 (float64 inputs: float64), cast back to q.dtype. See the module
    header for conventions."""
    _check_shapes(q, k, v)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    heads, kv_heads = q.shape[1], k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    if kv_heads != heads:
        group = heads // kv_heads
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)

    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask.is_floating_point():
            scores = scores + attn_mask.to(compute)
        else:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    allowed = structural_mask(
        q_len, kv_len, causal=causal, causal_alignment=causal_alignment, window=window, device=q.device
    )
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))

    if normalizer == "softmax":
        row_max = scores.amax(dim=-1, keepdim=True)
        dead = torch.isneginf(row_max)  # fully masked row: zeros, like SDPA's safe softmax
        e = torch.exp(scores - torch.where(dead, torch.zeros_like(row_max), row_max))
        p = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        p = p.masked_fill(dead, 0.0)
    else:
        p = torch.sigmoid(scores)  # sigmoid(-inf) == 0: masked entries contribute nothing
    return torch.matmul(p, vf).to(q.dtype)
