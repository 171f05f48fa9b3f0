"""Predicted vs measured speedups of every recorded kernel row (issue 19: predictions that hold).

Reads the recorded runs, predicts each row with the cost model (`attnopt.cost.roofline.estimate`
on the recorded sizes, dtype and tiles) and prints predicted vs measured speedup and their ratio,
before (the profile without its measured sparse figures: efficiency 1.0, no per-Q-tile or
masked-tile cost) and after. Rows, by kind:
  * gna (GPU): the GNA kernel over our dense kernel on the same q, k, v (`realized_vs_own_dense`);
    predicted: `estimate(...).speedup_vs_dense` (the dense baseline the planner uses).
  * window (GPU): the causal sliding-window kernel over our causal kernel (`realized_vs_own_causal`).
  * causal (GPU): our causal kernel over our dense kernel at the same dtype, D and S (two rows of
    the dense section, each predicted with its own recorded tiles).
  * dense (GPU): no speedup to compare; predicted vs measured time (ms), for the record.
  * cpu gna / cpu window: bench/kernels.py's CPU rows (the 2-D layout is that script's fixed
    64x64 grid, window 16x16, H=4, D=64, fp32; the JSON records stride and tiles), on this
    machine's measured CPU profile, with the kernel the file records (native: 0.8, SDPA on
    tiles: 0.55); the CPU profile has no per-Q-tile cost, so before = after there.

Usage: .venv/bin/python bench/predictions.py [--check]   (--check: exit 1 when a GPU gna/window
row is off by more than 25% after the fit)
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnopt.cost.hardware import HardwareProfile, cpu_profile, get_profile, profile_for_device  # noqa: E402
from attnopt.cost.roofline import dense_baseline, estimate  # noqa: E402
from attnopt.ir import AttentionSpec, GNALayout, MaskSpec, Variant  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TOLERANCE = 1.25  # predicted / measured within [1/1.25, 1.25]
CPU_LAYOUT_SHAPE, CPU_LAYOUT_WINDOW, CPU_H, CPU_D = (64, 64), (16, 16), 4, 64  # bench/kernels.py


def unfitted(hw: HardwareProfile) -> HardwareProfile:
    """hw as the cost model saw it before issue 19: no measured sparse figures."""
    return replace(hw, sparse_efficiency={}, q_tile_overhead_s=0.0, masked_tile_cost=0.0)


def _spec(B: int, H: int, S: int, D: int, mask: MaskSpec = MaskSpec(), dtype: str = "bf16"):
    return AttentionSpec("softmax", B, H, H, S, S, D, D, D ** -0.5, mask=mask, dtype=dtype)


def _causal(B, H, S, D, dtype="bf16"):
    return _spec(B, H, S, D, MaskSpec("causal", left=None, right=0), dtype)


def _window(B, H, S, D, W, dtype="bf16"):
    return _spec(B, H, S, D, MaskSpec("sliding_window", left=W - 1, right=0), dtype)


def _tiles(cfg: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(cfg["q_tile"]), tuple(cfg["kv_tile"])


def _layout(text: str) -> GNALayout:
    """The recorded repr `GNALayout(shape=(64, 64), ...)` read back without eval."""
    body = text[text.index("(") + 1:text.rindex(")")]
    fields = {}
    for part in body.split("), "):
        key, val = part.split("=", 1)
        items = [x.strip() for x in val.strip("()").split(",") if x.strip()]
        fields[key.strip()] = tuple((x == "True") if x in ("True", "False") else int(x) for x in items)
    return GNALayout(**fields)


def _dtype(name: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[name]


def gpu_rows(path: Path) -> list[dict]:
    """One prediction per recorded row of a gpu_kernels JSON: {source, row, kind, measured,
    before, after} (speedups; kind "dense": times in ms)."""
    data = json.loads(path.read_text())
    hw = get_profile(profile_for_device(data["device"]))
    if hw.family == "cpu":
        raise SystemExit(f"{path}: no GPU profile for {data['device']!r}")
    out = []
    dense_ms = {(r["dtype"], r["D"], r["S"]): (r, r["triton_ms"]) for r in data["rows"]
                if r["section"] == "dense" and not r["causal"]}
    for r in data["rows"]:
        pred = {}
        for when, prof in (("before", unfitted(hw)), ("after", hw)):
            if r["section"] == "gna":
                qt, kt = _tiles(r["config"])
                v = Variant("block_sparse_gna", qt, kt, layout=_layout(r["layout"]))
                pred[when] = estimate(_spec(r["B"], r["H"], r["N"], r["D"], dtype=_dtype(r["dtype"])),
                                      v, prof).speedup_vs_dense
            elif r["section"] == "window":
                qt, kt = _tiles(r["config"])
                args = (r["B"], r["H"], r["S"], r["D"])
                causal = _causal(*args)
                pred[when] = (estimate(causal, replace(dense_baseline(causal, prof), family="causal"),
                                       prof).time_s /
                              estimate(_window(*args, r["window"]), Variant("sliding_window", qt, kt),
                                       prof).time_s)
            elif r["section"] == "dense":
                args = (r["B"], r["H"], r["S"], r["D"])
                dt = _dtype(r["dtype"])
                qt, kt = _tiles(r["config"])
                mine = estimate(_causal(*args, dt) if r["causal"] else _spec(*args, dtype=dt),
                                Variant(r["family"], qt, kt), prof)
                if not r["causal"]:
                    pred[when] = mine.time_s * 1e3
                    continue
                base_row, _ = dense_ms[(r["dtype"], r["D"], r["S"])]
                bq, bk = _tiles(base_row["config"])
                base = estimate(_spec(*args, dtype=dt), Variant("dense", bq, bk), prof)
                pred[when] = base.time_s / mine.time_s
        if r["section"] == "gna":
            name, kind, meas = r["case"], "gna", r["realized_vs_own_dense"]
        elif r["section"] == "window":
            name, kind, meas = f"S={r['S']} window {r['window']}", "window", r["realized_vs_own_causal"]
        else:
            name = f"{r['dtype']} D={r['D']} S={r['S']}"
            if r["causal"]:
                kind, meas = "causal", dense_ms[(r["dtype"], r["D"], r["S"])][1] / r["triton_ms"]
            else:
                kind, meas = "dense", r["triton_ms"]
        out.append({"source": path.name, "device": hw.name, "row": name, "kind": kind,
                    "measured": meas, **pred})
    return out


def cpu_rows(path: Path, cpu: HardwareProfile) -> list[dict]:
    """Predictions for bench/kernels.py's CPU rows (see the module header)."""
    data = json.loads(path.read_text())
    prof = replace(cpu, sparse_efficiency={"default": 0.8 if data.get("native_kernel") else 0.55})
    out = []
    for r in data.get("cpu", []):
        lay = GNALayout(CPU_LAYOUT_SHAPE, CPU_LAYOUT_WINDOW, tuple(r["stride"]))
        s = _spec(1, CPU_H, math.prod(CPU_LAYOUT_SHAPE), CPU_D, dtype="fp32")
        # the CPU kernel gathers, per Q box, exactly the keys it needs: KV tiles of one token
        v = Variant("block_sparse_gna", tuple(r["q_tile"]), (1, 1), layout=lay, dynamic_kv_tiling=True)
        p = estimate(s, v, prof).speedup_vs_dense
        out.append({"source": path.name, "device": "local CPU", "row": f"2d_64x64_w16 stride "
                    f"{'x'.join(map(str, r['stride']))} q {'x'.join(map(str, r['q_tile']))}",
                    "kind": "cpu gna", "measured": r["speedup_vs_dense"], "before": p, "after": p})
    for r in data.get("cpu_window", []):
        W = int(r["case"].rsplit(" ", 1)[1])
        args = (1, r["H"], r["S"], r["D"])
        causal = _causal(*args, "fp32")
        base = estimate(causal, replace(dense_baseline(causal, prof), family="causal"), prof)
        win = estimate(_window(*args, W, "fp32"), Variant("sliding_window", (int(r["q_tile"]),), (1,)),
                       prof)
        p = base.time_s / win.time_s
        out.append({"source": path.name, "device": "local CPU", "row": f"S={r['S']} window {W}",
                    "kind": "cpu window", "measured": r["speedup_vs_causal"], "before": p, "after": p})
    return out


def all_rows() -> list[dict]:
    rows = []
    for f in sorted(glob.glob(str(RESULTS / "gpu_kernels_*.json"))):
        rows += gpu_rows(Path(f))
    cpu = None
    for f in sorted(glob.glob(str(RESULTS / "kernels_cpu_*.json"))):
        cpu = cpu or cpu_profile()
        rows += cpu_rows(Path(f), cpu)
    return rows


def within(row: dict, when: str = "after") -> bool:
    ratio = row[when] / row["measured"]
    return 1 / TOLERANCE <= ratio <= TOLERANCE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a GPU gna/window row is off by >25%%")
    a = ap.parse_args()
    rows = all_rows()
    print("| source | row | kind | measured | predicted before | ratio before | predicted after | "
          "ratio after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        unit = " ms" if r["kind"] == "dense" else "x"
        print(f"| {r['source']} | {r['row']} | {r['kind']} | {r['measured']:.3g}{unit} | "
              f"{r['before']:.3g}{unit} | {r['before'] / r['measured']:.2f} | {r['after']:.3g}{unit} | "
              f"{r['after'] / r['measured']:.2f} |")
    print()
    for kinds in (("gna", "window"), ("causal",), ("dense",), ("cpu gna", "cpu window")):
        sel = [r for r in rows if r["kind"] in kinds]
        if not sel:
            continue
        for when in ("before", "after"):
            ratios = [r[when] / r["measured"] for r in sel]
            print(f"{'/'.join(kinds)} ({len(sel)} rows), {when}: ratio {min(ratios):.2f}-{max(ratios):.2f}, "
                  f"{sum(within(r, when) for r in sel)}/{len(sel)} within 25%")
    bad = [r for r in rows if r["kind"] in ("gna", "window") and not within(r)]
    if a.check and bad:
        print("off by more than 25%: " + ", ".join(r["row"] for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
