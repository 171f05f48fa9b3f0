"""A small DiT-style model whose attention is genuinely local, planned and applied by attnopt.

Model: a Conv2d patch embedding of a [B, 4, 64, 64] latent (patch 2: a 32 x 32 grid, 1024 tokens),
16 text tokens concatenated after the image tokens, then transformer blocks (LayerNorm, joint
self-attention by SDPA, MLP) over the [B, 1024 + 16, C] sequence. Sharpened random weights.

Planted locality (why: random weights give global attention, where no window fits any error
budget): each head's last `ndim + 2` dims of q and k carry positional features, not content (their
projection rows are zero), chosen so that q_i . k_j = -sum_ax a_ax (p_i,ax - p_j,ax)^2 + const_i
for grid tokens i, j at grid positions p:
    q_i = [2 a p_i, -1, sum a p_i^2 - t],   k_j = [p_j, sum a p_j^2, 0]      (grid tokens)
    q_text = 0 (text queries attend by content over everything), k_text = [0, 0, 1]
so an image query sees every text key as if it sat `t` logits below its own position: text stays
global both ways. The q features are multiplied by sqrt(D) to cancel SDPA's 1/sqrt(D).
`a` per axis is `sharpness / (w/2)^2` with w a quarter of the axis: keys half a quarter-grid away
lose `sharpness` logits.

Run: `python examples/dit_local.py OUT_DIR [--threads N]` plans at max_error 5e-2 (target cpu), applies the plan,
prints the chosen layouts, the measured CPU speedup and the held-out error (rich table), and
writes OUT_DIR/dit_local_plan.json and OUT_DIR/dit_local_report.html (attnopt.cli.plan.write_report).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ---- planted-local building blocks (bench/planted_local.py builds Flux- and Wan-style models) ----


def grid_coords(shape: tuple[int, ...]) -> torch.Tensor:
    """[prod(shape), ndim] row-major grid positions, centered (smaller |p|^2 keeps the logits'
    constant terms small, so fp32 rounding stays far below the planted differences)."""
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))


def axis_scales(shape: tuple[int, ...], sharpness: float = 12.0) -> torch.Tensor:
    """a per axis: a key (w/2) away along an axis loses `sharpness` logits, w = a quarter of it."""
    return torch.tensor([sharpness / max(1.0, max(2, round(n * 0.25)) / 2) ** 2 for n in shape],
                        dtype=torch.float64)


def planted_features(shape: tuple[int, ...], leading: int, trailing: int, heads: int, head_dim: int,
                     text_offset: float = 2.0, sharpness: float = 12.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos, k_pos) [S, heads * head_dim]: zero except each head's last ndim + 2 dims (see the
    module docstring). Token order: `leading` text, the grid row-major, `trailing` text."""
    nd = len(shape)
    P = nd + 2
    if P > head_dim:
        raise ValueError(f"head_dim {head_dim} has no room for {P} positional dims")
    p = grid_coords(shape)
    a = axis_scales(shape, sharpness)
    n = p.shape[0]
    S = leading + n + trailing
    q = torch.zeros(S, P, dtype=torch.float64)
    k = torch.zeros(S, P, dtype=torch.float64)
    img = slice(leading, leading + n)
    q[img, :nd] = 2 * a * p
    q[img, nd] = -1.0
    q[img, nd + 1] = (a * p * p).sum(-1) - text_offset
    k[img, :nd] = p
    k[img, nd] = (a * p * p).sum(-1)
    k[:leading, nd + 1] = 1.0
    k[leading + n:, nd + 1] = 1.0
    q *= math.sqrt(head_dim)
    qf = torch.zeros(S, heads, head_dim, dtype=torch.float64)
    kf = torch.zeros(S, heads, head_dim, dtype=torch.float64)
    qf[..., head_dim - P:] = q[:, None]
    kf[..., head_dim - P:] = k[:, None]
    return qf.reshape(S, -1).float(), kf.reshape(S, -1).float()


class PlantedAttention(nn.Module):
    """Self-attention (SDPA) whose q and k get the planted positional features added."""

    def __init__(self, hidden: int, heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor):
        super().__init__()
        self.heads, self.d = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.o = nn.Linear(hidden, hidden)
        self.register_buffer("q_pos", q_pos)
        self.register_buffer("k_pos", k_pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = (q + self.q_pos).view(b, s, self.heads, self.d).transpose(1, 2)
        k = (k + self.k_pos).view(b, s, self.heads, self.d).transpose(1, 2)
        v = v.view(b, s, self.heads, self.d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o(o.transpose(1, 2).reshape(b, s, c))


class CrossAttention(nn.Module):
    """Queries from the sequence, keys and values from the text (Wan's attn2)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.d = heads, hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q = self.q(x).view(b, s, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(text).view(b, text.shape[1], 2, self.heads, self.d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o(o.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    """Pre-norm block: planted self-attention, optional cross-attention to text, MLP (ratio 2:
    small, so attention dominates the FLOPs)."""

    def __init__(self, hidden: int, heads: int, q_pos, k_pos, cross: bool = False):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = PlantedAttention(hidden, heads, q_pos, k_pos)
        self.cross = CrossAttention(hidden, heads) if cross else None
        self.nc = nn.LayerNorm(hidden) if cross else None
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        if self.cross is not None:
            x = x + self.cross(self.nc(x), text)
        return x + self.mlp(self.n2(x))


@torch.no_grad()
def sharpen_planted(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight matrix / conv kernel redrawn with std 2/sqrt(fan_in) (sharp attention), then
    the q and k projection rows of the positional dims zeroed (they carry positions only)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            fan_in = p.numel() // p.shape[0]
            p.copy_(torch.randn(p.shape, generator=g) * 2 / math.sqrt(fan_in))
    for m in model.modules():
        if isinstance(m, PlantedAttention):
            hidden = m.o.in_features
            pos = (m.q_pos != 0).any(0) | (m.k_pos != 0).any(0)  # [hidden]: positional dims
            for part in (0, 1):  # q rows, k rows
                rows = torch.arange(hidden)[pos] + part * hidden
                m.qkv.weight[rows] = 0
                m.qkv.bias[rows] = 0
    return model.eval()


# ---- the DiT-style example ----------------------------------------------------------------------

class DiTLocal(nn.Module):
    """latents [B, 4, 2G, 2G] -> Conv2d patch 2 -> G x G tokens, then `text` [B, T, 32] -> Linear,
    concatenated after the image tokens; `layers` blocks; out: the image tokens' [B, G*G, 16]."""

    def __init__(self, grid: int = 32, text_tokens: int = 16, hidden: int = 64, heads: int = 2,
                 layers: int = 2, sharpness: float = 12.0):
        super().__init__()
        self.patch = nn.Conv2d(4, hidden, 2, stride=2)
        self.txt = nn.Linear(32, hidden)
        q_pos, k_pos = planted_features((grid, grid), 0, text_tokens, heads, hidden // heads,
                                        sharpness=sharpness)
        self.blocks = nn.ModuleList(Block(hidden, heads, q_pos, k_pos) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 16)
        self.n = grid * grid

    def forward(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.patch(latents).flatten(2).transpose(1, 2)
        x = torch.cat([x, self.txt(text)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x[:, :self.n]))


def dit_local(grid: int = 32, text_tokens: int = 16, hidden: int = 64, heads: int = 2, layers: int = 2,
              batch: int = 1, sharpness: float = 12.0):
    """(model, make_inputs(seed) -> kwargs): the sharpened DiT-style model and its inputs.
    sharpness 0 plants no locality (attention by content alone: global)."""
    model = sharpen_planted(DiTLocal(grid, text_tokens, hidden, heads, layers, sharpness))

    def make(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"latents": torch.randn(batch, 4, 2 * grid, 2 * grid, generator=g),
                "text": torch.randn(batch, text_tokens, 32, generator=g)}
    return model, make


# ---- measuring (shared with bench/planted_local.py) ------------------------------------------------

def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def timed_ratio(a, b, inputs: dict, reps: int) -> tuple[float, float, float, float]:
    """(median a ms, median b ms, median of per-round a/b, the same ratio in process CPU time):
    interleaved calls, one warm-up each. The CPU-time ratio is the steadier one on a shared machine
    with one torch thread (time spent descheduled does not count); with more threads it counts
    OpenMP's spin-waiting too, so read the wall-clock ratio there."""
    with torch.no_grad():
        a(**inputs), b(**inputs)
        ta, tb, ca, cb = [], [], [], []
        for _ in range(reps):
            for f, wall, cpu in ((a, ta, ca), (b, tb, cb)):
                t, c = time.perf_counter(), time.process_time()
                f(**inputs)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    return (statistics.median(ta) * 1e3, statistics.median(tb) * 1e3,
            statistics.median(x / y for x, y in zip(ta, tb)),
            statistics.median(x / max(y, 1e-9) for x, y in zip(ca, cb)))


def plan_and_measure(model, make, max_error: float = 5e-2, reps: int = 5, target: str = "cpu") -> dict:
    """Plan at `max_error`, apply, time against the original on a held-out input (seed 1; the
    plan calibrates on seed 0) and measure the held-out error. Returns a JSON-able dict and,
    under "_plan", the Plan itself."""
    import attnopt

    example, held = make(0), make(1)
    t = time.perf_counter()
    plan = attnopt.plan(model, example, policy="approx", max_error=max_error, target=target)
    plan_s = time.perf_counter() - t
    res = attnopt.optimize(model, example, plan=plan)
    with torch.no_grad():
        ref, got = model(**held), res.model(**held)
    orig_ms, opt_ms, ratio, cpu_ratio = timed_ratio(model, res.model, held, reps)
    sites = []
    for s in plan.sites:
        c = s.choice
        sites.append({"site": s.site, "choice": c.name if c is not None else f"kept: {s.reason}",
                      "leading": getattr(c, "leading", 0), "trailing": getattr(c, "trailing", 0),
                      "predicted_speedup": c.speedup if c is not None else 1.0})
    pred = plan.predicted.get("end_to_end_speedup")
    return {"max_error": max_error, "target": target, "sites": sites,
            "predicted_attention_speedup": plan.predicted.get("attention_speedup"),
            "predicted_times_s": dict(plan.predicted),
            "predicted_end_to_end_speedup": pred,
            "calibration_rel_l2": plan.measured.get("rel_l2"), "held_out_rel_l2": rel_l2(got, ref),
            "original_ms": orig_ms, "optimized_ms": opt_ms, "measured_end_to_end_speedup": ratio,
            "measured_end_to_end_speedup_cpu_time": cpu_ratio, "threads": torch.get_num_threads(),
            "predicted_over_measured": (pred / ratio) if pred else None,
            "sites_rewritten": res.sites_rewritten, "plan_s": plan_s, "_plan": plan}


def main(argv: list[str]) -> None:
    import argparse

    from rich.console import Console
    from rich.table import Table

    from attnopt.cli.plan import write_report

    ap = argparse.ArgumentParser(description="plan, apply and measure the planted-local DiT-style model")
    ap.add_argument("out_dir", nargs="?", default="out/demo")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, make = dit_local()
    r = plan_and_measure(model, make)
    plan = r.pop("_plan")
    (out / "dit_local_plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    write_report(plan, out / "dit_local_report.html", "DiT-style, 32x32 patches + 16 text tokens")
    t = Table(title="DiT-style planted-local model: plan at max_error 5e-2 (target cpu), applied")
    for col in ("site", "chosen variant", "predicted site speedup"):
        t.add_column(col)
    for s in r["sites"]:
        t.add_row(s["site"], s["choice"], f"{s['predicted_speedup']:.2f}x")
    c = Console(width=max(Console().width, 110))
    c.print(t)
    s = Table(show_header=False)
    s.add_row("predicted CPU end-to-end speedup", f"{r['predicted_end_to_end_speedup']:.2f}x")
    s.add_row("measured CPU end-to-end speedup (median of 5 interleaved rounds)",
              f"{r['measured_end_to_end_speedup']:.2f}x  ({r['original_ms']:.1f} ms -> {r['optimized_ms']:.1f} ms)")
    s.add_row("  the same in process CPU time (steadier on a shared machine with 1 thread)",
              f"{r['measured_end_to_end_speedup_cpu_time']:.2f}x  ({r['threads']} torch threads)")
    s.add_row("held-out error (relative L2, fresh input)", f"{r['held_out_rel_l2']:.2e}  (budget 5e-2)")
    s.add_row("report", str(out / "dit_local_report.html"))
    c.print(s)


if __name__ == "__main__":
    main(sys.argv[1:])
