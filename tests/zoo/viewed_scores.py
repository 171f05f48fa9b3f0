"""Attention whose scores are viewed in another layout between the score matmul and the softmax,
written the way vision backbones outside transformers write it (random, sharpened weights).

  SwinWindows   shifted-window attention: scores [B_, H, N, N] viewed as [B_/nW, nW, H, N, N] to
                add the per-window shift mask, viewed back; plus the relative-position bias table
                (a gather from a [(2w-1)^2, H] table) on every window.
  DecomposedRelPos  ViTDet / SAM: scores [B*H, N, N] viewed as [B*H, qh, qw, kh, kw] to add
                rel_h[..., None] + rel_w[..., None, :], both computed from q (einsum with
                per-axis relative tables), viewed back.
Near misses: a view that does not refine the score axes ([B*H, N, N] as [B*H, N/2, 2N]), a
bias computed from the scores themselves, a view that is never undone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rel_index(w: int) -> torch.Tensor:
    c = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, mask_style: str = "add"):
        super().__init__()
        self.h, self.w, self.scale, self.mask_style = heads, window, (dim // heads) ** -0.5, mask_style
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("index", _rel_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            if self.mask_style == "add":
                attn = attn.view(b_ // nw, nw, self.h, n, n) + mask.unsqueeze(1).unsqueeze(0)
            else:  # a bool mask of the pairs in the same region, filled with -inf
                attn = attn.view(b_ // nw, nw, self.h, n, n).masked_fill(
                    ~mask.unsqueeze(1).unsqueeze(0), float("-inf"))
            attn = attn.view(-1, self.h, n, n)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    b, hh, ww, c = x.shape
    return x.view(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _unwindows(x: torch.Tensor, w: int, b: int, hh: int, ww: int) -> torch.Tensor:
    return x.view(b, hh // w, ww // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, -1)


def _shift_regions(hh: int, ww: int, w: int, s: int) -> torch.Tensor:
    img = torch.zeros(1, hh, ww, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    r = _windows(img, w).squeeze(-1)  # [nW, N]
    return r[:, None, :] == r[:, :, None]  # [nW, N, N]: True where the pair shares a region


class SwinWindows(nn.Module):
    """Two blocks: plain windows, then shifted windows with the per-window mask."""

    def __init__(self, dim: int = 32, heads: int = 4, window: int = 4, grid: int = 8,
                 mask_style: str = "add"):
        super().__init__()
        self.w, self.s, self.grid, self.mask_style = window, window // 2, grid, mask_style
        self.embed = nn.Linear(3, dim)
        self.blocks = nn.ModuleList(WindowAttention(dim, heads, window, mask_style) for _ in range(2))
        same = _shift_regions(grid, grid, window, window // 2)
        self.register_buffer("same", same, persistent=False)
        self.register_buffer("additive", torch.where(same, 0.0, -100.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.embed(x.view(b, self.grid, self.grid, 3))
        for i, blk in enumerate(self.blocks):
            shift = self.s if i % 2 else 0
            y = torch.roll(h, (-shift, -shift), (1, 2)) if shift else h
            mask = (self.additive if self.mask_style == "add" else self.same) if shift else None
            y = _unwindows(blk(_windows(y, self.w), mask), self.w, b, self.grid, self.grid)
            h = h + (torch.roll(y, (shift, shift), (1, 2)) if shift else y)
        return h


def _rel_pos(size: int, table: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return table[coords.long()]


class RelPosAttention(nn.Module):
    def __init__(self, dim: int, heads: int, size: int, variant: str = "vitdet"):
        super().__init__()
        self.h, self.size, self.variant = heads, size, variant
        hd = dim // heads
        self.scale = hd ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_h = nn.Parameter(torch.randn(2 * size - 1, hd))
        self.rel_w = nn.Parameter(torch.randn(2 * size - 1, hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hh, ww, _ = x.shape
        qkv = self.qkv(x).reshape(b, hh * ww, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.h, hh * ww, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh, rw = _rel_pos(hh, self.rel_h), _rel_pos(ww, self.rel_w)
        r_q = q.reshape(b * self.h, hh, ww, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        if self.variant == "vitdet":  # scores viewed to 5-D, both terms added there, viewed back
            attn = (attn.view(b * self.h, hh, ww, hh, ww) + rel_h[:, :, :, :, None]
                    + rel_w[:, :, :, None, :]).view(b * self.h, hh * ww, hh * ww)
        elif self.variant == "sam":  # the bias built in 5-D and reshaped to the scores' shape
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b * self.h, hh * ww, hh * ww)
            attn = attn + bias
        elif self.variant == "mixed":  # near miss: a view that does not refine the score axes
            n = hh * ww
            attn = (attn.view(b * self.h, n // 2, 2 * n) + rel_h.reshape(b * self.h, n // 2, -1)[..., :1]
                    ).view(b * self.h, n, n)
        elif self.variant == "self":  # near miss: the "bias" is computed from the scores
            attn = attn + attn.detach().view(b * self.h, hh, ww, hh * ww).mean(2, keepdim=True).expand(
                -1, -1, ww, -1).reshape(b * self.h, hh * ww, hh * ww)
        elif self.variant == "unclosed":  # near miss: viewed, never viewed back
            attn = (attn.view(b * self.h, hh, ww, hh, ww) + rel_h[:, :, :, :, None]).flatten(3)
            attn = attn.softmax(-1).flatten(1, 2)
            return self.proj((attn @ v).view(b, self.h, hh, ww, -1).permute(0, 2, 3, 1, 4).reshape(b, hh, ww, -1))
        attn = attn.softmax(dim=-1)
        out = (attn @ v).view(b, self.h, hh, ww, -1).permute(0, 2, 3, 1, 4).reshape(b, hh, ww, -1)
        return self.proj(out)


class DecomposedRelPos(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, size: int = 4, variant: str = "vitdet"):
        super().__init__()
        self.size = size
        self.embed = nn.Linear(3, dim)
        self.attn = RelPosAttention(dim, heads, size, variant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.embed(x.view(b, self.size, self.size, 3))
        return h + self.attn(F.layer_norm(h, h.shape[-1:]))


class PerHeadScale(nn.Module):
    """Swin v2's cosine attention: normalized q and k, scores times a learned per-head logit
    scale ([H, 1, 1], clamped and exponentiated), then a bias. Near misses: a factor that varies
    along the keys ([H, 1, N]), and a bias added before the tensor factor."""

    def __init__(self, dim: int = 32, heads: int = 4, n: int = 16, variant: str = "swinv2"):
        super().__init__()
        self.h, self.variant, self.size = heads, variant, int(n ** 0.5)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.embed = nn.Linear(3, dim)
        shape = (heads, 1, n) if variant == "per_key" else (heads, 1, 1)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(shape) + 1))
        self.bias = nn.Parameter(torch.randn(heads, n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scale = torch.clamp(self.logit_scale, max=4.6052).exp()
        if self.variant == "bias_first":
            attn = (attn + self.bias) * scale
        else:
            attn = attn * scale + self.bias
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def sharpen(model: nn.Module, factor: float = 3.0) -> nn.Module:
    """Scale the weights up so attention is peaked (default inits hide wrong scales)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * factor * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3))
    return model.eval()


def inputs(model: nn.Module, batch: int = 2) -> torch.Tensor:
    n = model.grid * model.grid if isinstance(model, SwinWindows) else model.size * model.size
    return torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(1))
