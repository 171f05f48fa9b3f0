"""Sharpen a randomly initialised model so attention is far from uniform.

Default inits (std 0.02) give nearly uniform attention, so a wrong scale or a dropped mask
barely moves the output (FACTS.md, "numerical validation needs sharp attention"). Redrawing
every weight matrix with std 2/sqrt(fan_in) makes those bugs visible while exact rewrites
stay at fp32 noise.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def sharpen_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter with ndim >= 2 (linear, embedding, conv kernels) in place with
    std 2/sqrt(fan_in), fan_in = numel / size(0). Deterministic for a given seed and model."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():  # named_parameters dedups tied weights
        if p.ndim < 2:
            continue
        fan_in = p.numel() // p.size(0)
        w = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (2.0 / math.sqrt(fan_in))
        p.copy_(w.to(p.dtype))
    return model
