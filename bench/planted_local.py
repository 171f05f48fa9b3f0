"""Planted-local benchmark (issue 19): approximate GNA plans on models whose attention is local.

Two models, random sharpened weights, small hidden size so attention dominates (attention FLOPs /
linear FLOPs ~ S / (6 d)), with locality planted in q and k (examples/dit_local.py: positional
features whose dot product is -sum_ax a_ax (p_i,ax - p_j,ax)^2 up to per-query constants; text
tokens global both ways):
  * flux: Flux-style joint attention, `--text` text tokens FIRST then a 64 x 64 image grid packed
    from a [B, 16, 128, 128] latent (2 x 2 patches by view/permute/reshape, then a Linear), one
    sequence of text + 4096 image tokens through single-stream blocks;
  * wan: Wan-style video self-attention over 8 x 32 x 32 tokens from a Conv3d patch embedding
    (patch 1 x 2 x 2 of a [B, 16, 8, 64, 64] latent), plus cross-attention to 64 text tokens.
For each: the token layout attnopt infers per site, `attnopt.plan(policy="approx", max_error,
target="cpu")`, the plan applied with `attnopt.optimize(model, inputs, plan=plan)`, the predicted CPU
end-to-end speedup, the measured one (same run, interleaved, median of per-round ratios, on a fresh
input), the held-out error (relative L2 on that input) and predicted / measured.

    .venv/bin/python bench/planted_local.py [--models flux wan] [--max-error 5e-2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from dit_local import Block, planted_features, plan_and_measure, sharpen_planted  # noqa: E402


class FluxLocal(nn.Module):
    """text [B, T, 64] -> Linear; latents [B, 16, 2G, 2G] packed into G*G tokens of 64 -> Linear;
    x = cat([text, image]); `layers` single-stream blocks; out: the image tokens' [B, G*G, 64]."""

    def __init__(self, grid: int, text: int, hidden: int, heads: int, layers: int):
        super().__init__()
        self.txt = nn.Linear(64, hidden)
        self.img = nn.Linear(64, hidden)
        q_pos, k_pos = planted_features((grid, grid), text, 0, heads, hidden // heads)
        self.blocks = nn.ModuleList(Block(hidden, heads, q_pos, k_pos) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 64)
        self.t = text

    def forward(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape  # Flux's _pack_latents: 2 x 2 patches, row-major over the grid
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        x = self.img(x.reshape(b, (h // 2) * (w // 2), c * 4))
        x = torch.cat([self.txt(text), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x[:, self.t:]))


class WanLocal(nn.Module):
    """video latents [B, 16, F, 2G, 2G] -> Conv3d patch (1, 2, 2) -> F x G x G tokens; text
    [B, T, 64] -> Linear, the keys of each block's cross-attention; out [B, F*G*G, 64]."""

    def __init__(self, frames: int, grid: int, text: int, hidden: int, heads: int, layers: int):
        super().__init__()
        self.patch = nn.Conv3d(16, hidden, (1, 2, 2), stride=(1, 2, 2))
        self.txt = nn.Linear(64, hidden)
        q_pos, k_pos = planted_features((frames, grid, grid), 0, 0, heads, hidden // heads)
        self.blocks = nn.ModuleList(Block(hidden, heads, q_pos, k_pos, cross=True) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 64)

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.patch(video).flatten(2).transpose(1, 2)
        t = self.txt(text)
        for blk in self.blocks:
            x = blk(x, t)
        return self.out(self.norm(x))


def flux(a) -> tuple[str, nn.Module, callable, dict]:
    g = a.flux_grid
    model = sharpen_planted(FluxLocal(g, a.text, a.hidden, a.heads, a.layers))

    def make(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return {"latents": torch.randn(1, 16, 2 * g, 2 * g, generator=gen),
                "text": torch.randn(1, a.text, 64, generator=gen)}
    S = a.text + g * g
    return (f"Flux-style joint attention: {a.text} text tokens first + {g}x{g} image grid "
            f"(packed latents, Linear), hidden {a.hidden}, {a.heads} heads, {a.layers} layers",
            model, make, {"seq": S, "expected_layout": {"shape": [g, g], "leading": a.text, "trailing": 0}})


def wan(a) -> tuple[str, nn.Module, callable, dict]:
    f, g = a.wan_frames, a.wan_grid
    model = sharpen_planted(WanLocal(f, g, 64, a.hidden, a.heads, a.layers))

    def make(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return {"video": torch.randn(1, 16, f, 2 * g, 2 * g, generator=gen),
                "text": torch.randn(1, 64, 64, generator=gen)}
    return (f"Wan-style video self-attention over {f}x{g}x{g} tokens (Conv3d patches) + cross-attention "
            f"to 64 text tokens, hidden {a.hidden}, {a.heads} heads, {a.layers} layers",
            model, make, {"seq": f * g * g, "expected_layout": {"shape": [f, g, g], "leading": 0, "trailing": 0}})


MODELS = {"flux": flux, "wan": wan}


def layouts(model, example) -> list[dict]:
    import attnopt

    with torch.no_grad():
        rep = attnopt.inspect(model, example)
    return [{"site": s.name, "layout": s.spec.token_grid.describe() if s.spec.token_grid else None,
             "shape": list(s.spec.token_grid.shape) if s.spec.token_grid else None,
             "leading": s.spec.token_grid.leading if s.spec.token_grid else None,
             "trailing": s.spec.token_grid.trailing if s.spec.token_grid else None,
             "reason": s.spec.token_grid_reason} for s in rep.sites]


def run(name: str, a) -> dict:
    title, model, make, info = MODELS[name](a)
    print(f"== {title}", flush=True)
    lay = layouts(model, make(0))
    want = info["expected_layout"]
    for x in lay:
        x["as_expected"] = (x["shape"], x["leading"], x["trailing"]) == (want["shape"], want["leading"],
                                                                         want["trailing"])
        print(f"   layout {x['site']}: {x['layout']} {x['reason']} (as expected: {x['as_expected']})", flush=True)
    r = plan_and_measure(model, make, max_error=a.max_error, reps=a.reps)
    plan = r.pop("_plan")
    row = {"model": name, "title": title, **info, "layouts": lay, **r,
           "plan_walk": [w.to_json() for w in plan.walk],
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for s in r["sites"]:
        print(f"   {s['site']}: {s['choice']}", flush=True)
    print(f"   predicted CPU e2e {r['predicted_end_to_end_speedup']:.2f}x, measured "
          f"{r['measured_end_to_end_speedup']:.2f}x ({r['original_ms']:.0f} -> {r['optimized_ms']:.0f} ms; "
          f"in process CPU time {r['measured_end_to_end_speedup_cpu_time']:.2f}x), "
          f"predicted/measured {r['predicted_over_measured'] or float('nan'):.2f}, held-out rel L2 "
          f"{r['held_out_rel_l2']:.2e} (calibration {r['calibration_rel_l2']}), plan {r['plan_s']:.0f} s",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--max-error", type=float, default=5e-2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--text", type=int, default=256, help="Flux-style text tokens")
    ap.add_argument("--flux-grid", type=int, default=64)
    ap.add_argument("--wan-frames", type=int, default=8)
    ap.add_argument("--wan-grid", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = [run(m, a) for m in a.models]
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
