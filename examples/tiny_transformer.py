"""A tiny transformer written in plain torch, with hand-written attention (no downloads).

Layer 0 and 1: causal self-attention with grouped-query heads (4 query heads, 2 kv heads),
a padding mask from an integer attention_mask, and the scale applied to q. The last layer
returns its attention weights, so attnopt must leave it alone (a near miss, shown by
`attnopt inspect --explain`).

`python examples/tiny_transformer.py OUT_DIR` writes OUT_DIR/tiny_transformer.onnx and .pt2.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

VOCAB, HIDDEN, HEADS, KV_HEADS, SEQ = 128, 64, 4, 2, 32


class Attention(nn.Module):
    def __init__(self, return_weights: bool = False):
        super().__init__()
        self.d = HIDDEN // HEADS
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.kv = nn.Linear(HIDDEN, 2 * KV_HEADS * self.d)
        self.o = nn.Linear(HIDDEN, HIDDEN)
        self.return_weights = return_weights
        self.register_buffer("causal", torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor):
        b, s, _ = x.shape
        q = (self.q(x) * (1.0 / math.sqrt(self.d))).view(b, s, HEADS, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, KV_HEADS, self.d).permute(2, 0, 3, 1, 4)
        rep = HEADS // KV_HEADS
        k = k[:, :, None].expand(b, KV_HEADS, rep, s, self.d).reshape(b, HEADS, s, self.d)
        v = v[:, :, None].expand(b, KV_HEADS, rep, s, self.d).reshape(b, HEADS, s, self.d)
        scores = q @ k.transpose(-1, -2)
        scores = scores.masked_fill(~self.causal[:s, :s], float("-inf"))
        scores = scores + (1.0 - key_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        probs = torch.softmax(scores, dim=-1)
        out = self.o((probs @ v).transpose(1, 2).reshape(b, s, HIDDEN))
        return (out, probs) if self.return_weights else (out, None)


class TinyTransformer(nn.Module):
    def __init__(self, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Attention(return_weights=(i == layers - 1)) for i in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(HIDDEN) for _ in range(layers))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        x = self.embed(input_ids)
        weights = None
        for norm, layer in zip(self.norms, self.layers):
            y, w = layer(norm(x), attention_mask)
            x = x + y
            weights = w if w is not None else weights
        return self.head(x), weights


def example_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, -5:] = 0
    return ids, mask


def build() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer().eval()


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, inputs = build(), example_inputs()
    ep = torch.export.export(model, inputs, strict=False)
    torch.export.save(ep, out / "tiny_transformer.pt2")
    torch.onnx.export(model, inputs, out / "tiny_transformer.onnx", dynamo=True, verbose=False,
                      input_names=["input_ids", "attention_mask"])
    print(f"wrote {out / 'tiny_transformer.pt2'} and {out / 'tiny_transformer.onnx'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out")
