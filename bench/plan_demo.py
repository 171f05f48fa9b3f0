"""Planner demonstration (issue 6): a ViT with a 64x64 patch grid and a Llama at 4K tokens.

HF models from small configs with their default random initialization (nothing is downloaded),
SDPA attention (what a user runs by default). For each --max-error: `attnopt.plan(policy="approx",
target="h100")` gives the predicted H100 attention and end-to-end speedups; the plan is applied
with `attnopt.optimize(model, inputs, plan=plan)` and the result timed on this CPU against the
original (interleaved repetitions, median of per-round ratios; the approximate sites run the exact
CPU sparse kernels), with the error on a held-out input (relative L2, cosine). The exact plan
(policy "exact") is measured the same way for reference.

    .venv/bin/python bench/plan_demo.py [--models vit llama] [--errors 1e-2 5e-2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import attnopt
from attnopt.planner.metrics import cosine, rel_l2


def vit(layers: int):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=1024, patch_size=16, hidden_size=192, num_hidden_layers=layers,
                    num_attention_heads=3, intermediate_size=768, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    make = lambda seed: {"pixel_values": torch.randn(1, 3, 1024, 1024,  # noqa: E731
                                                     generator=torch.Generator().manual_seed(seed))}
    return "ViT 64x64 patches (+CLS), hidden 192, 3 heads", model, make


def llama(layers: int):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation="sdpa", use_cache=False)  # prefill: no KV cache output
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    make = lambda seed: {"input_ids": torch.randint(0, 1000, (1, 4096),  # noqa: E731
                                                    generator=torch.Generator().manual_seed(seed))}
    return "Llama seq 4096, hidden 256, 4 heads / 2 kv heads", model, make


MODELS = {"vit": vit, "llama": llama}


def first(x):
    while not isinstance(x, torch.Tensor):
        x = x[0] if isinstance(x, (tuple, list)) else x.to_tuple()[0]
    return x


def timed_ratio(a, b, inputs, reps: int) -> tuple[float, float, float]:
    """(median a ms, median b ms, median of per-round a/b) with interleaved calls."""
    with torch.no_grad():
        a(**inputs), b(**inputs)
        ta, tb = [], []
        for _ in range(reps):
            t = time.perf_counter()
            a(**inputs)
            ta.append(time.perf_counter() - t)
            t = time.perf_counter()
            b(**inputs)
            tb.append(time.perf_counter() - t)
    return (statistics.median(ta) * 1e3, statistics.median(tb) * 1e3,
            statistics.median(x / y for x, y in zip(ta, tb)))


def run(name: str, layers: int, errors, reps: int) -> list[dict]:
    title, model, make = MODELS[name](layers)
    example, held_out = make(0), make(1)
    with torch.no_grad():
        ref = first(model(**held_out))
    rows = []
    for policy, max_error in [("exact", 0.0)] + [("approx", e) for e in errors]:
        t = time.perf_counter()
        plan = attnopt.plan(model, example, policy=policy, max_error=max_error or 1e-2, target="h100")
        plan_s = time.perf_counter() - t
        res = attnopt.optimize(model, example, plan=plan)
        with torch.no_grad():
            got = first(res.model(**held_out))
        orig_ms, opt_ms, ratio = timed_ratio(model, res.model, held_out, reps)
        choices = [s.choice.name if s.choice is not None else "kept" for s in plan.sites]
        row = {"model": title, "policy": policy, "max_error": max_error if policy == "approx" else None,
               "sites": len(plan.sites), "choices": choices,
               "predicted_h100_attention_speedup": plan.predicted["attention_speedup"],
               "predicted_h100_end_to_end_speedup": plan.predicted["end_to_end_speedup"],
               "calibration_rel_l2": plan.measured.get("rel_l2"),
               "held_out_rel_l2": rel_l2(ref, got), "held_out_cosine": cosine(ref, got),
               "cpu_original_ms": orig_ms, "cpu_optimized_ms": opt_ms, "cpu_speedup": ratio,
               "sites_rewritten": res.sites_rewritten, "plan_s": plan_s}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--errors", nargs="+", type=float, default=[1e-2, 5e-2])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [r for m in a.models for r in run(m, a.layers, a.errors, a.reps)]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
