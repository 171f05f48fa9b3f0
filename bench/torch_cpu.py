"""torch on CPU: attnopt vs eager and vs inductor on a BERT-base-shaped model.

Model: transformers BertModel from a config (12 layers, hidden 768, 12 heads, intermediate
3072, max positions 2048, attn_implementation="eager"), sharpened random weights, fp32, eval,
batch 1, input_ids + attention_mask (the last quarter of the tokens padded).
torch.set_num_threads(2), torch.no_grad().

Part 1 (--part eager): `attnopt.optimize(model, inputs).model` (an exported GraphModule with
attention spliced) vs the eager module, at --eager-seq (default 512 2048).
Part 2 (--part compile): `torch.compile(model, backend="attnopt")` vs `torch.compile(model)`
(inductor), dynamic=False, a fresh model copy per variant, torch._dynamo.reset() per seq, at
--compile-seq (default 128 512); compile + warm-up first, then only steady-state calls are timed.
Every timing interleaves the variants (A B A B ...), median; ratio = baseline / attnopt.
Outputs are compared (max |diff| / max |baseline|) before timing.

    python bench/torch_cpu.py [--part eager compile] [--reps 10 3]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(seq: int):
    from transformers import BertConfig, BertModel

    from zoo.sharpen import sharpen_

    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=max(2048, seq),
                     attn_implementation="eager", return_dict=False, use_cache=False)
    m = BertModel(cfg, add_pooling_layer=False).float().eval()
    sharpen_(m, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (1, seq), generator=g)
    am = torch.ones(1, seq, dtype=torch.long)
    am[0, seq - seq // 4:] = 0
    return m, {"input_ids": ids, "attention_mask": am}


def first(out):
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def timed(fns: dict, inputs: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(**inputs)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def part_eager(seqs: list[int], reps: list[int]) -> None:
    import attnopt

    print("\n### attnopt.optimize(model, inputs).model vs eager\n")
    print("| seq | eager ms | attnopt ms | ratio | sites rewritten | max rel err | optimize s | reps | load 1/5/15 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, s in enumerate(seqs):
        r = reps[min(i, len(reps) - 1)]
        m, inp = build(s)
        with torch.no_grad():
            t0 = time.perf_counter()
            try:
                res = attnopt.optimize(m, inp)
            except Exception as e:
                print(f"| {s} | failed: attnopt.optimize raised {type(e).__name__}: {str(e)[:300]} |||||||")
                traceback.print_exc()
                continue
            opt_s = time.perf_counter() - t0
            fast = res.model
            ref = first(m(**inp))
            err = rel_err(ref, first(fast(**inp)))
            ms = timed({"eager": m, "attnopt": fast}, inp, r)
        print(f"| {s} | {ms['eager']:.1f} | {ms['attnopt']:.1f} | {ms['eager'] / ms['attnopt']:.2f}x | "
              f"{res.sites_rewritten}/{res.sites_found} | {err:.1e} | {opt_s:.0f} | {r} | {load()} |", flush=True)


def part_compile(seqs: list[int], reps: list[int]) -> None:
    import attnopt  # noqa: F401  (registers the "attnopt" backend)

    print("\n### torch.compile(backend=\"attnopt\") vs torch.compile (inductor)\n")
    print("| seq | eager ms | inductor ms | attnopt ms | attnopt vs inductor | attnopt vs eager | "
          "compile s inductor / attnopt | max rel err | reps | load 1/5/15 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, s in enumerate(seqs):
        r = reps[min(i, len(reps) - 1)]
        torch._dynamo.reset()
        m, inp = build(s)
        fns = {"eager": m}
        compile_s = {}
        outs = {}
        with torch.no_grad():
            ref = first(m(**inp))
            for name, kw in (("inductor", {}), ("attnopt", {"backend": "attnopt"})):
                c = torch.compile(copy.deepcopy(m), dynamic=False, **kw)
                t0 = time.perf_counter()
                try:
                    outs[name] = first(c(**inp))
                    c(**inp)
                except Exception as e:
                    print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    traceback.print_exc()
                    continue
                compile_s[name] = time.perf_counter() - t0
                fns[name] = c
            if "attnopt" not in fns:
                print(f"| {s} | failed: torch.compile(backend='attnopt') raised (see above) |||||||||")
                continue
            ms = timed(fns, inp, r)
        err = max(rel_err(ref, o) for o in outs.values())
        ind = f"{ms['inductor']:.1f}" if "inductor" in ms else "failed"
        vs_ind = f"{ms['inductor'] / ms['attnopt']:.2f}x" if "inductor" in ms else "n/a"
        print(f"| {s} | {ms['eager']:.1f} | {ind} | {ms['attnopt']:.1f} | {vs_ind} | "
              f"{ms['eager'] / ms['attnopt']:.2f}x | {compile_s.get('inductor', float('nan')):.0f} / "
              f"{compile_s['attnopt']:.0f} | {err:.1e} | {r} | {load()} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", nargs="+", default=["eager", "compile"])
    ap.add_argument("--eager-seq", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--compile-seq", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--reps", type=int, nargs="+", default=[10, 3],
                    help="interleaved repetitions per seq of each part (the last value repeats)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, CPU, "
          f"{torch.get_num_threads()} threads, fp32, no_grad, batch 1; median ms; ratio = baseline / attnopt")
    if "eager" in args.part:
        part_eager(args.eager_seq, args.reps)
    if "compile" in args.part:
        part_compile(args.compile_seq, args.reps)


if __name__ == "__main__":
    main()
