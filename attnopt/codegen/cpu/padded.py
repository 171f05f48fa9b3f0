"""Exact CPU kernel for causal attention over a padded batch: the structure as the op's causal flag,
the padding as a per-row key mask (passes/rewrite.key_padding_flags emits this form).

Canonical layouts (as attnopt::attention):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask bool [B|1, 1, 1, Skv]
  (True = the key is real), out [B, H, Sq, Dv] in q.dtype.

How: each batch row's real keys must be one run [s, e) (left padding: e = Skv; right padding:
s = 0), read from the mask at run time; a mask with holes is refused and takes the dense path.
Then, for a prefill (Sq = Skv, causal; top-left = bottom-right there):
  rows i <  s   see no key: 0, as SDPA gives a fully masked row (the dense path's result);
  rows s <= i < e   see keys [s, i]: SDPA(is_causal) on the run, which skips the upper triangle;
  rows i >= e   see every real key [s, e): SDPA without a mask.
For a decode step (Sq = 1, bottom-right: the query sees every key) the row reads keys [s, e).
Work: sum over rows of len_b^2 / 2, never more than the unpadded causal batch, where the dense
masked path did B * Skv^2 (the mask defeats SDPA's causal tile skipping) and built a [B, 1, Sq, Skv]
mask. Not differentiable-specific: every piece is SDPA on views, so autograd flows through it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.codegen.params import AttentionParams, TokenLayout

# Below this many keys one dense SDPA call costs less than the per-row calls.
MIN_KEYS = 128


def _key_mask(attn_mask: Tensor | None, q: Tensor, k: Tensor) -> tuple[Tensor | None, str]:
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return None, "needs a bool key mask"
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        return None, f"mask {tuple(attn_mask.shape)} is not a key mask [B|1, 1, 1, Skv]"
    if attn_mask.shape[0] not in (1, q.shape[0]) or attn_mask.shape[3] != k.shape[2]:
        return None, f"mask {tuple(attn_mask.shape)} does not broadcast to the batch and keys"
    return attn_mask[:, 0, 0, :], ""


def can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
            layout: TokenLayout | None = None) -> tuple[bool, str]:
    """The kernel table's check (codegen/select.py): shapes and flags here, the runs in `runs`."""
    if layout is not None:
        return False, "a GNA layout"
    if q.device.type != "cpu":
        return False, f"tensors on {q.device}"
    if not params.causal or params.window is not None:
        return False, "not plain causal"
    if params.normalizer != "softmax" or params.softcap is not None:
        return False, "softmax without softcap only (SDPA)"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return False, "mixed or non-float dtypes"
    sq, skv = q.shape[2], k.shape[2]
    if not (sq == skv or (sq == 1 and params.causal_alignment == "bottom_right")):
        return False, f"{sq} queries over {skv} keys (prefill Sq = Skv, or one bottom-right query)"
    if skv < MIN_KEYS:
        return False, f"{skv} keys (< {MIN_KEYS}: one dense call is cheaper)"
    keys, why = _key_mask(attn_mask, q, k)
    if keys is None:
        return False, why
    if runs(keys) is None:
        return False, "a row's keys are not one run (not left or right padding)"
    return True, ""


def runs(keys: Tensor) -> list[tuple[int, int]] | None:
    """[s, e) of each row's real keys, or None when some row's keys are not one run."""
    n = keys.sum(-1)
    first = keys.int().argmax(-1)
    pos = torch.arange(keys.shape[-1])
    inside = (pos >= first[:, None]) & (pos < (first + n)[:, None])
    if not torch.equal(inside, keys):
        return None
    return [(int(s), int(s + c)) for s, c in zip(first.tolist(), n.tolist())]


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, params: AttentionParams) -> Tensor:
    """The exact result, row by row (see the module header). The caller checked can_run."""
    keys, _ = _key_mask(attn_mask, q, k)
    spans = runs(keys)
    B, H, sq, _ = q.shape
    out = q.new_zeros(B, H, sq, v.shape[-1])
    gqa = H != k.shape[1]
    for b in range(B):
        s, e = spans[b if len(spans) > 1 else 0]
        if s == e:
            continue  # every row of this batch row sees no key: zeros
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e]
        if sq == 1:  # one bottom-right query: every real key
            out[b:b + 1] = F.scaled_dot_product_attention(qb, kb, vb, scale=params.scale, enable_gqa=gqa)
            continue
        out[b:b + 1, :, s:e] = F.scaled_dot_product_attention(qb[:, :, s:e], kb, vb, is_causal=True,
                                                              scale=params.scale, enable_gqa=gqa)
        if e < sq:
            out[b:b + 1, :, e:] = F.scaled_dot_product_attention(qb[:, :, e:], kb, vb, scale=params.scale,
                                                                 enable_gqa=gqa)
    return out
