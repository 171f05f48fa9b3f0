"""Hand-written attention modules: every form detection must handle, and near misses.

Plain torch, B=2, heads 4 (2 for GQA kv), S=12, D=8 unless a case says otherwise. Each
`HandCase` has either `expected` (list of expected-site dicts, see zoo.hf.site) or
`expected_reject`: keywords separated by "|"; the rejection reason must contain at least one
(case-insensitive). Near misses must produce no site at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.hf import site

B, H, S, D = 2, 4, 12, 8
E = H * D
SC = D ** -0.5
NEG = float("-inf")


@dataclass
class HandCase:
    name: str
    module: nn.Module
    args: tuple
    expected: list[dict[str, Any]] | None = None
    expected_reject: str | None = None
    notes: str = ""

    @property
    def near_miss(self) -> bool:
        return self.expected_reject is not None

    def as_zoo(self):
        """This case as a ZooModel (positional args), so zoo.flavours can export it."""
        from zoo.hf import ZooModel

        return ZooModel(self.name, self.module, {}, self.expected or [], family="hand", args=self.args)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(h: int = H, kvh: int | None = None, s: int = S, d: int = D, dtype=torch.float32, seed=0):
    g = _g(seed)
    kvh = h if kvh is None else kvh
    return (torch.randn(B, h, s, d, generator=g).to(dtype), torch.randn(B, kvh, s, d, generator=g).to(dtype),
            torch.randn(B, kvh, s, d, generator=g).to(dtype))


def pad_mask(s: int = S) -> torch.Tensor:
    am = torch.ones(B, s, dtype=torch.long)
    am[1, s - 3:] = 0
    return am


class Fn(nn.Module):
    """A module around a plain function (keeps each case a few lines)."""

    def __init__(self, fn: Callable, **params: torch.Tensor):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            if isinstance(v, nn.Parameter):
                self.register_parameter(k, v)
            else:
                self.register_buffer(k, v)

    def forward(self, *args):
        return self.fn(self, *args)


def kT(k):
    return k.transpose(-2, -1)


def sm(x):
    return torch.softmax(x, dim=-1)


def causal_bool(s: int = S) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).tril()


# ---- positives -----------------------------------------------------------------------------

def _positives() -> list[HandCase]:
    c: list[HandCase] = []
    std = [site(heads=H, q=S, hd=D)]

    def add(name, fn, args=None, expected=None, notes="", **params):
        c.append(HandCase(name, Fn(fn, **params).eval(), qkv() if args is None else args,
                          std if expected is None else expected, notes=notes))

    # score products and K layouts
    add("matmul_div_scores", lambda m, q, k, v: sm(q @ kT(k) / math.sqrt(D)) @ v)
    add("matmul_mul_scores", lambda m, q, k, v: sm(torch.matmul(q, k.transpose(-1, -2)) * 0.125) @ v,
        expected=[site(heads=H, q=S, hd=D, scale=0.125)])
    add("einsum", lambda m, q, k, v: torch.einsum(
        "bhqk,bhkd->bhqd", sm(torch.einsum("bhqd,bhkd->bhqk", q, k) * SC), v))
    add("k_permute_bshd", lambda m, q, k, v: sm(q @ k.permute(0, 2, 3, 1) * SC) @ v.transpose(1, 2),
        args=(qkv()[0], qkv()[1].transpose(1, 2).contiguous(), qkv()[2].transpose(1, 2).contiguous()),
        notes="k and v arrive as [B,S,H,D]; k permuted straight to [B,H,D,S]")
    add("k_pretransposed_input", lambda m, q, kt, v: sm(q @ kt * SC) @ v,
        args=(qkv()[0], kT(qkv()[1]).contiguous(), qkv()[2]), notes="k passed as [B,H,D,S]")

    def bmm3d(m, x):
        q, k, v = (t.view(B, S, H, D).transpose(1, 2).reshape(B * H, S, D) for t in m.proj(x).chunk(3, -1))
        o = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * SC, -1), v)
        return o.view(B, H, S, D).transpose(1, 2).reshape(B, S, E)
    c.append(HandCase("bmm_3d_heads_folded", Fn(bmm3d).eval(), (torch.randn(B, S, E, generator=_g(1)),),
                      std, notes="[B*H,S,D] bmm; heads split by reshape from a fused qkv projection"))
    c[-1].module.proj = nn.Linear(E, 3 * E)

    def baddbmm(m, q, k, v):
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        bias = torch.zeros(S, S).masked_fill(~causal_bool(), NEG)
        sc = torch.baddbmm(bias.expand(B * H, S, S), q3, k3.transpose(1, 2), beta=1.0, alpha=SC)
        return torch.bmm(torch.softmax(sc, -1), v3).view(B, H, S, D)
    add("baddbmm_causal", baddbmm, expected=[site(heads=H, q=S, hd=D, mask="causal")],
        notes="BLOOM-style: baddbmm(mask, q, k^T, alpha=scale)")

    # heads merged into the batch around the softmax: [B*H] products, [B, H] scores
    def bloom_merged(m, q, k, v, am):
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        alibi = (m.slopes[:, None] * torch.arange(S, dtype=q.dtype)[None, :]).repeat(B, 1)[:, None, :]
        sc = torch.baddbmm(alibi, q3, k3.transpose(1, 2), beta=1.0, alpha=SC).view(B, H, S, S)
        keep = causal_bool() & am[:, None, None, :].bool()
        p = torch.softmax(sc + torch.zeros(B, 1, S, S).masked_fill(~keep, torch.finfo(q.dtype).min), -1)
        return torch.bmm(p.view(B * H, S, S), v3).view(B, H, S, D)
    add("merged_heads_baddbmm_alibi", bloom_merged, args=(*qkv(), pad_mask()),
        expected=[site(heads=H, q=S, hd=D, mask="causal", padding=True, score_mods=("alibi",))],
        slopes=torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)]),
        notes="BLOOM-style: baddbmm(ALiBi [B*H, 1, S]) viewed as [B, H, S, S], masked, viewed back")

    def deberta_merged(m, q, k, v, am):
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        sc = torch.bmm(q3, k3.transpose(-1, -2) / math.sqrt(D)).view(-1, H, S, S)
        sc = sc.masked_fill(~am[:, None, None, :].bool(), torch.finfo(q.dtype).min)
        return torch.bmm(torch.softmax(sc, -1).view(-1, S, S), v3).view(-1, H, S, D)
    add("merged_heads_scale_on_kT", deberta_merged, args=(*qkv(), pad_mask()),
        expected=[site(heads=H, q=S, hd=D, mask="padding", padding=True)],
        notes="DeBERTa-style: bmm(q, k^T / sqrt(d)) viewed as [B, H, S, S], masked_fill(finfo.min)")

    # where the scale goes
    def inplace_scale(m, q, k, v):
        s = q @ kT(k)
        s /= math.sqrt(D)  # dynamo records operator.itruediv (Falcon, MPNet)
        return sm(s) @ v
    add("scale_inplace_div", inplace_scale)
    add("scale_on_q_mul", lambda m, q, k, v: sm((q * SC) @ kT(k)) @ v)
    add("scale_on_q_div", lambda m, q, k, v: sm((q / math.sqrt(D)) @ kT(k)) @ v)
    add("scale_on_k", lambda m, q, k, v: sm(q @ (k * SC).transpose(-2, -1)) @ v)
    add("scale_split_sqrt", lambda m, q, k, v: sm((q * D ** -0.25) @ (kT(k) * D ** -0.25)) @ v,
        notes="sqrt(scale) on q and on k^T (SDPA decomposition style)")
    add("no_scale", lambda m, q, k, v: sm(q @ kT(k)) @ v, expected=[site(heads=H, q=S, hd=D, scale=1.0)])

    # additive float masks and biases
    def int_padding(m, q, k, v, am):
        ext = (1.0 - am[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        return sm(q @ kT(k) * SC + ext) @ v
    add("additive_padding_from_int_mask", int_padding, args=(*qkv(), pad_mask()),
        expected=[site(heads=H, q=S, hd=D, mask="padding", padding=True)])

    add("padding_subtracted", lambda m, q, k, v, am: sm(q @ kT(k) * SC - 1e9 * (1.0 - am[:, None, None, :].float())) @ v,
        args=(*qkv(), pad_mask()), expected=[site(heads=H, q=S, hd=D, mask="padding", padding=True)],
        notes="Funnel-style: scores - INF * (1 - mask)")

    def relpos(m, q, k, v):
        idx = torch.arange(S)[None, :] - torch.arange(S)[:, None] + S - 1
        return sm(q @ kT(k) * SC + m.table[:, idx]) @ v
    add("relative_position_table", relpos, expected=[site(heads=H, q=S, hd=D, score_mods=("bias",))],
        table=nn.Parameter(torch.randn(H, 2 * S - 1, generator=_g(2))))

    def alibi(m, q, k, v):
        dist = (torch.arange(S)[None, :] - torch.arange(S)[:, None]).to(q.dtype)  # j - i
        s = q @ kT(k) * SC + m.slopes[:, None, None] * dist
        return sm(s.masked_fill(~causal_bool(), NEG)) @ v
    add("alibi_causal", alibi, expected=[site(heads=H, q=S, hd=D, mask="causal", score_mods=("alibi",))],
        slopes=torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)]))

    def mask_before_scale(m, q, k, v, am):
        keep = causal_bool() & am[:, None, None, :].bool()
        ext = torch.zeros(B, 1, S, S).masked_fill(~keep, torch.finfo(q.dtype).min)
        return sm((q @ kT(k) + ext) / math.sqrt(D)) @ v
    add("mask_added_before_scale", mask_before_scale, args=(*qkv(), pad_mask()),
        expected=[site(heads=H, q=S, hd=D, mask="causal", padding=True)],
        notes="CodeGen-style: (q k^T + mask) / sqrt(D)")

    def alibi_finite_fill(m, q, k, v, am):
        dist = (torch.arange(S)[None, :] - torch.arange(S)[:, None]).to(q.dtype)
        s = q @ kT(k) * SC + m.slopes[:, None, None] * dist
        drop = ~(causal_bool() & am[:, None, None, :].bool())
        return sm(s.masked_fill(drop, torch.finfo(q.dtype).min)) @ v
    add("alibi_then_finite_fill_padding", alibi_finite_fill, args=(*qkv(), pad_mask()),
        expected=[site(heads=H, q=S, hd=D, mask="causal", padding=True, score_mods=("alibi",))],
        slopes=torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)]),
        notes="MPT-style: ALiBi added, then masked_fill(causal & padding, finfo.min); a row whose "
              "keys are all padded averages V")

    # boolean / structural masks
    cz = [site(heads=H, q=S, hd=D, mask="causal")]
    add("causal_where_tril", lambda m, q, k, v: sm(torch.where(causal_bool(), q @ kT(k) * SC, NEG)) @ v,
        expected=cz)
    add("causal_masked_fill_triu", lambda m, q, k, v: sm(
        (q @ kT(k) * SC).masked_fill(torch.triu(torch.ones(S, S), diagonal=1).bool(), NEG)) @ v, expected=cz)

    def arange_causal(m, q, k, v):
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        return sm((q @ kT(k) * SC).masked_fill(j > i, NEG)) @ v
    add("causal_arange_compare", arange_causal, expected=cz)

    def buffer_slice(m, q, k, v):
        s = q.shape[-2]
        keep = m.bias[:, :, :s, :s]
        return sm(torch.where(keep.bool(), q @ kT(k) * SC, torch.finfo(q.dtype).min)) @ v
    add("causal_tril_buffer_slice", buffer_slice, expected=cz,
        bias=torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32), notes="old GPT-2 style")

    def window(m, q, k, v):
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        ok = (j <= i) & (i - j < 4)
        return sm((q @ kT(k) * SC).masked_fill(~ok, NEG)) @ v
    add("sliding_window_arange", window,
        expected=[site(heads=H, q=S, hd=D, mask="sliding_window", left=3, right=0)])

    def blockdiag(m, q, k, v):
        blk = torch.arange(S) // 4
        return sm((q @ kT(k) * SC).masked_fill(blk[:, None] != blk[None, :], NEG)) @ v
    bd = site(heads=H, q=S, hd=D)
    bd["mask"] = {"kind": "block", "left": None, "right": None, "padding": False, "block": 4}
    add("block_diagonal", blockdiag, expected=[bd])

    # dtype casts around softmax, dropout, NaN guard
    bf = qkv(dtype=torch.float16)
    add("softmax_float_cast", lambda m, q, k, v: torch.softmax((q @ kT(k) * SC).float(), -1).to(q.dtype) @ v,
        args=bf)
    add("softmax_dtype_arg", lambda m, q, k, v: F.softmax(q @ kT(k) * SC, dim=-1, dtype=torch.float32).to(v.dtype) @ v,
        args=bf)
    c.append(HandCase("dropout_eval", _DropoutAttn().eval(), qkv(), std))
    add("nan_guard", lambda m, q, k, v: (lambda p: torch.where(torch.isnan(p), 0.0, p))(sm(q @ kT(k) * SC)) @ v)

    # GQA / MQA
    gq = [site(heads=H, kv_heads=2, q=S, hd=D)]

    def repeat_kv(x, n):
        b, h, s, d = x.shape
        return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)
    add("gqa_repeat_kv", lambda m, q, k, v: sm(q @ kT(repeat_kv(k, 2)) * SC) @ repeat_kv(v, 2),
        args=qkv(kvh=2), expected=gq)
    add("gqa_repeat_interleave", lambda m, q, k, v: sm(
        q @ kT(k.repeat_interleave(2, dim=1)) * SC) @ v.repeat_interleave(2, dim=1), args=qkv(kvh=2), expected=gq)
    add("mqa_broadcast", lambda m, q, k, v: sm(q @ kT(k) * SC) @ v, args=qkv(kvh=1),
        expected=[site(heads=H, kv_heads=1, q=S, hd=D)], notes="k/v [B,1,S,D] broadcast by matmul")

    # score mods and other normalizers
    add("softcap", lambda m, q, k, v: sm(torch.tanh(q @ kT(k) * SC / 30.0) * 30.0) @ v,
        expected=[site(heads=H, q=S, hd=D, score_mods=("softcap:30.0",))], notes="Gemma-2 style")
    add("sigmoid_attention", lambda m, q, k, v: torch.sigmoid(q @ kT(k) * SC + (-math.log(S))) @ v,
        expected=[site(heads=H, q=S, hd=D, normalizer="sigmoid", score_mods=("bias",))],
        notes="sigmoid(q k^T * scale + b), b = -log(S) a constant scalar bias")

    # fused calls
    add("sdpa_plain", lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v))
    add("sdpa_causal", lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), expected=cz)
    add("sdpa_bool_padding_mask", lambda m, q, k, v, am: F.scaled_dot_product_attention(
        q, k, v, attn_mask=am[:, None, None, :].bool()), args=(*qkv(), pad_mask()),
        expected=[site(heads=H, q=S, hd=D, mask="padding", padding=True)])
    add("sdpa_scale", lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3),
        expected=[site(heads=H, q=S, hd=D, scale=0.3)])
    add("sdpa_enable_gqa", lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        args=qkv(kvh=2), expected=gq)
    c.append(HandCase("nn_multihead_attention", _MHA().eval(), (torch.randn(B, S, E, generator=_g(3)),), std,
                      notes="batch_first, need_weights=False (fast path in eager no-grad)"))
    c.append(HandCase("vit_block_conv_patch_cls", _ViTBlock().eval(),
                      (torch.randn(B, 3, 16, 16, generator=_g(4)),),
                      [site(heads=H, q=17, hd=D, grid=(4, 4), leading=1)],
                      notes="Conv2d 4x4/4 patches on 16x16 -> 4x4 grid + class token"))
    return c


class _DropoutAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop(sm(q @ kT(k) * SC)) @ v


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class _ViTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, E, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, E, generator=_g(5)))
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)            # [B, 16, E]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)  # [B, 17, E]
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        o = (sm(q @ kT(k) * SC) @ v).transpose(1, 2).reshape(b, n, E)
        return self.out(o)


# ---- near misses ----------------------------------------------------------------------------

def _near_misses() -> list[HandCase]:
    c: list[HandCase] = []

    def add(name, fn, reject, args=None, notes=""):
        c.append(HandCase(name, Fn(fn).eval(), qkv() if args is None else args, expected_reject=reject, notes=notes))

    add("softmax_over_query_axis", lambda m, q, k, v: torch.softmax(q @ kT(k) * SC, dim=-2) @ v, "axis")
    add("probs_also_returned", lambda m, q, k, v: (lambda p: (p @ v, p))(sm(q @ kT(k) * SC)),
        "users|output|escape")
    add("scores_also_returned", lambda m, q, k, v: (lambda s: (sm(s) @ v, s))(q @ kT(k) * SC),
        "users|output|escape")
    add("non_constant_scale", lambda m, q, k, v, t: sm(q @ kT(k) * t) @ v, "constant|scale",
        args=(*qkv(), torch.tensor(0.3)))
    add("probs_contract_query_axis", lambda m, q, k, v: sm(q @ kT(k) * SC).transpose(-2, -1) @ v,
        "contract|axis|dim", notes="p^T @ v sums over queries, not keys")
    add("cross_covariance_contract_seq", lambda m, q, k, v: v @ sm(q.transpose(-2, -1) @ k * SC),
        "contract|axis|dim", notes="XCiT-style [D,D] attention: q^T k contracts the sequence")
    add("nonlinear_between_softmax_and_pv", lambda m, q, k, v: (lambda p: (p * p) @ v)(sm(q @ kT(k) * SC)),
        "users|between|nonlinear|mul")
    add("bias_inside_softcap", lambda m, q, k, v: sm(torch.tanh((q @ kT(k) * SC + 1.0) / 30.0) * 30.0) @ v,
        "softcap", notes="tanh((s + b) / cap) * cap: the bias cannot leave the tanh")
    add("mask_before_negative_scale", lambda m, q, k, v: sm(
        (q @ kT(k)).masked_fill(~causal_bool(), torch.finfo(q.dtype).min) * -SC) @ v, "scaled by|negative|fill",
        notes="a finfo.min fill times a negative factor is a huge positive score: not a mask")
    add("merged_heads_probs_heads_major", lambda m, q, k, v: torch.bmm(
        torch.softmax(torch.bmm(q.reshape(B * H, S, D), k.reshape(B * H, S, D).transpose(1, 2)).view(B, H, S, S)
                      * SC, -1).transpose(0, 1).reshape(B * H, S, S), v.reshape(B * H, S, D)),
        "not a matmul|reshape|sits between",
        notes="probabilities merged heads-major ([H, B] order): they meet the wrong V rows")
    add("where_fills_zero", lambda m, q, k, v: sm(torch.where(causal_bool(), q @ kT(k) * SC, 0.0)) @ v,
        "fill|-inf|mask value", notes="a 'mask' that fills with 0 does not mask")
    return c


def cases() -> list[HandCase]:
    torch.manual_seed(0)
    return _positives() + _near_misses()


CASE_NAMES = [c.name for c in cases()]


def get(name: str) -> HandCase:
    return next(c for c in cases() if c.name == name)
