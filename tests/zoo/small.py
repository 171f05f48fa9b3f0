"""Small hand-made models shared by the planner's input and metric tests: two pre-norm-free
attention blocks over 32-dim tokens, 4 heads of 8, scores written out (so every site is a
decomposed softmax the planner can approximate)."""
from __future__ import annotations

from torch import nn


class Attn(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.qkv, self.o, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), h

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * (D // self.h) ** -0.5
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attn(), Attn()])

    def forward(self, x):
        for a in self.blocks:
            x = x + a(x)
        return x
