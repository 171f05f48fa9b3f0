"""Training on CPU (issue 21): forward + backward of GNA attention, attnopt vs SDPA with the layout as a
bool mask vs torch.compile'd flex_attention with the same block mask.

Case (defaults): a 64 x 64 token grid, window 16 x 16 (stride 1, no dilation, not causal), B=1, H=4,
D=64, fp32, torch.set_num_threads(--threads). q, k, v require grad; loss = (out * g).sum() for a fixed
random g; a step = forward + torch.autograd.grad(loss, (q, k, v)).
  attnopt  torch.ops.attnopt.gna_attention (gna_op.gna_attention_op): forward = the compiled tile
           kernel; backward = the op's backward (recomputes the tiles' forward, then the compiled tile
           backward, codegen/cpu/native_backward.py)
  sdpa     F.scaled_dot_product_attention(q, k, v, attn_mask=<bool [S, S] = gna.dense_mask(layout)>)
  flex     torch.compile(flex_attention)(q, k, v, block_mask=create_block_mask(mask_mod)), the mask_mod
           computed from token coordinates (per-dimension key ranges; checked equal to the bool mask);
           its compile time (first forward, first forward + backward) is reported apart, measured cold
           (inductor's cache in a fresh temporary folder), and any error of its forward or backward is
           reported as it is raised (torch 2.13: "FlexAttention does not support backward on CPU").
Forward-only columns run under torch.no_grad(). Every timing interleaves the variants round by round
(A B C A B C ...); figures are medians over --repeats rounds; ratios are (a) the ratio of the medians and
(b) the median of the per-round ratios (steadier on a shared machine). Before timing, the gradients of
attnopt and flex are compared with SDPA's (max |diff| / max |sdpa|, per input) and with a float64
reference (dense math with the same mask).

    .venv/bin/python bench/train_gna.py [--repeats 7] [--grid 64 64] [--window 16] [--heads 4]
        [--dim 64] [--batch 1] [--threads 2] [--no-flex] [--json PATH]

Writes bench/results/train_gna_<date>.json (or --json).
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

# flex's compile time is measured cold: inductor's caches go to a fresh folder (set before torch loads)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="train_gna_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import torch
import torch.nn.functional as F

from attnopt.codegen.gna_op import gna_attention_op
from attnopt.functional import gna_layout
from attnopt.sparsity import gna

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Case:
    def __init__(self, args):
        self.layout = gna_layout(tuple(args.grid), args.window)
        S = math.prod(args.grid)
        g = torch.Generator().manual_seed(0)
        shape = (args.batch, args.heads, S, args.dim)
        self.q, self.k, self.v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
        self.g = torch.randn(shape, generator=g)
        self.scale = args.dim ** -0.5
        self.mask = torch.from_numpy(gna.dense_mask(self.layout))
        self.S = S

    def inputs(self):
        return self.q, self.k, self.v


def attnopt_fn(c: Case):
    return lambda q, k, v: gna_attention_op(q, k, v, None, scale=c.scale, layout=c.layout)


def sdpa_fn(c: Case):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=c.mask, scale=c.scale)


def gna_mask_mod(layout):
    """The layout as a flex mask_mod computed from token coordinates (per dimension: the query's key
    range [start, end) and the dilation), as one writes NATTEN-style masks for flex; main() checks
    it equals gna.dense_mask."""
    ranges = [(torch.from_numpy(st), torch.from_numpy(en)) for st, en in gna.key_ranges(layout)]
    shape, dilation = layout.shape, layout.dilation

    def mask_mod(b, h, q_idx, kv_idx):
        ok, qr, kr = None, q_idx, kv_idx
        for d in reversed(range(len(shape))):
            qc, kc = qr % shape[d], kr % shape[d]
            qr, kr = qr // shape[d], kr // shape[d]
            start = ranges[d][0][qc]
            m = (kc >= start) & (kc < ranges[d][1][qc])
            if dilation[d] > 1:
                m = m & ((kc - start) % dilation[d] == 0)
            ok = m if ok is None else ok & m
        return ok

    return mask_mod


def flex_fn(c: Case):
    """(fn, block-mask seconds): compiled flex_attention with the layout as a block mask."""
    from torch.nn.attention.flex_attention import (
        create_block_mask,
        create_mask,
        flex_attention,
    )

    mask_mod = gna_mask_mod(c.layout)
    if not torch.equal(create_mask(mask_mod, 1, 1, c.S, c.S, device="cpu")[0, 0], c.mask):
        raise AssertionError("the flex mask_mod is not the layout's mask")
    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=c.S, KV_LEN=c.S, device="cpu")
    made = time.perf_counter() - t0
    compiled = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=c.scale)), made


def step(fn, c: Case):
    """One training step of the attention: forward, loss, gradients of q, k, v."""
    out = fn(*c.inputs())
    return torch.autograd.grad((out * c.g).sum(), c.inputs())


def forward(fn, c: Case):
    """Inference: no_grad, inputs that need no gradient (flex refuses CPU inputs that need one)."""
    with torch.no_grad():
        return fn(*(x.detach() for x in c.inputs()))


def reference_grads(c: Case):
    q, k, v = (x.detach().double().requires_grad_() for x in c.inputs())
    s = (q @ k.transpose(-1, -2)) * c.scale
    out = torch.softmax(s.masked_fill(~c.mask, float("-inf")), -1) @ v
    return torch.autograd.grad((out * c.g.double()).sum(), (q, k, v))


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs="+", default=[64, 64])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = Case(args)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "nproc": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "case": {"grid": args.grid, "window": args.window, "B": args.batch, "H": args.heads, "D": args.dim,
                     "dtype": "float32", "repeats": args.repeats},
            "load_start": load()}
    fns = {"attnopt": attnopt_fn(c), "sdpa_mask": sdpa_fn(c)}
    errors: dict[str, str] = {}
    if not args.no_flex:
        try:
            flex, made = flex_fn(c)
            info["flex_block_mask_s"] = made
            info["flex_compile_forward_s"] = seconds(lambda: forward(flex, c))
            fns["flex"] = flex
        except Exception as e:  # noqa: BLE001  reported as raised
            errors["flex"] = f"forward: {type(e).__name__}: {e}"
            traceback.print_exc()
    # warm (tuning, workspaces) and check gradients against SDPA and float64
    want = reference_grads(c)
    grads, checks = {}, {}
    step_fns = dict(fns)
    for name, fn in fns.items():
        try:
            t = seconds(lambda fn=fn: step(fn, c))
            grads[name] = step(fn, c)
            if name == "flex":
                info["flex_compile_step_s"] = t
        except Exception as e:  # noqa: BLE001
            errors[name] = f"backward: {type(e).__name__}: {str(e)[:2000]}"
            traceback.print_exc()
            step_fns.pop(name)
    base = forward(fns["sdpa_mask"], c)
    info["forward_rel_err_vs_sdpa"] = {n: rel(forward(fn, c), base) for n, fn in fns.items() if n != "sdpa_mask"}
    for name, gs in grads.items():
        checks[name] = {
            "vs_float64": {x: rel(g, w) for x, g, w in zip("qkv", gs, want)},
            "vs_sdpa": {x: rel(g, w) for x, g, w in zip("qkv", gs, grads["sdpa_mask"])} if name != "sdpa_mask" else None,
        }
    # timings, interleaved
    rounds: dict[str, dict[str, list[float]]] = {n: {"step": [], "forward": []} for n in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if name in step_fns:
                rounds[name]["step"].append(seconds(lambda fn=fn: step(fn, c)))
            rounds[name]["forward"].append(seconds(lambda fn=fn: forward(fn, c)))
    info["load_end"] = load()
    med = {n: {k: statistics.median(v) if v else None for k, v in r.items()} for n, r in rounds.items()}
    ratios = {}
    for other in fns:
        if other == "attnopt":
            continue
        for kind in ("step", "forward"):
            if not rounds[other][kind]:
                continue
            per_round = [o / a for o, a in zip(rounds[other][kind], rounds["attnopt"][kind])]
            ratios[f"{other}/attnopt {kind}"] = {
                "of_medians": med[other][kind] / med["attnopt"][kind],
                "median_per_round": statistics.median(per_round)}
    result = {**info, "medians_s": med, "rounds_s": rounds, "ratios": ratios, "grad_checks": checks,
              "errors": errors}
    report(result)
    path = args.json or RESULTS / f"train_gna_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    case = r["case"]
    t = Table(title=f"GNA fwd+bwd on CPU: grid {'x'.join(map(str, case['grid']))}, window {case['window']}, "
                    f"B={case['B']} H={case['H']} D={case['D']} fp32, {r['threads']} threads, {r['cpu']}")
    for col in ("variant", "fwd+bwd ms", "fwd ms (no_grad)", "fwd+bwd vs attnopt (medians / per round)",
                "fwd vs attnopt", "grad rel err vs sdpa (q/k/v)", "vs float64"):
        t.add_column(col)
    for name, m in r["medians_s"].items():
        rs = r["ratios"].get(f"{name}/attnopt step")
        rf = r["ratios"].get(f"{name}/attnopt forward")
        ch = r["grad_checks"].get(name, {})
        vs = ch.get("vs_sdpa")
        t.add_row(name, "-" if m["step"] is None else f"{m['step'] * 1e3:.1f}", f"{m['forward'] * 1e3:.1f}",
                  "-" if rs is None else f"{rs['of_medians']:.2f}x / {rs['median_per_round']:.2f}x",
                  "-" if rf is None else f"{rf['of_medians']:.2f}x / {rf['median_per_round']:.2f}x",
                  "-" if not vs else "/".join(f"{vs[x]:.1e}" for x in "qkv"),
                  "/".join(f"{ch['vs_float64'][x]:.1e}" for x in "qkv") if ch else "-")
    Console(width=180).print(t)
    for k in ("flex_block_mask_s", "flex_compile_forward_s", "flex_compile_step_s"):
        if k in r:
            print(f"{k}: {r[k]:.1f}")
    for name, e in r["errors"].items():
        print(f"{name} FAILED: {e[:600]}")
    print("forward max |diff| / max |sdpa|:", {n: f"{e:.1e}" for n, e in r["forward_rel_err_vs_sdpa"].items()})
    print(f"load average start {r['load_start']}, end {r['load_end']}")


if __name__ == "__main__":
    main()
