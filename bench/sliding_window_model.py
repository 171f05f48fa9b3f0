"""A sliding-window LLM on CPU: attnopt's exact rewrite vs the original, end to end.

Model: transformers MistralModel from a config (hidden 512, 8 heads / 2 KV heads, head dim 64,
intermediate 1024, --layers layers, sliding_window --window), sharpened random weights, fp32, eval,
batch 1, no KV cache, attn_implementation "sdpa" (HF's default) and "eager". The window lives in the
mask HF builds; attnopt finds it by evaluating the mask subgraph and runs the exact CPU window kernel
(attnopt::attention with a window: only each query run's keys are computed) instead of the dense masked
attention. torch.set_num_threads(--threads), torch.no_grad().

`attnopt.optimize(model, inputs).model` vs the eager module, interleaved (A B A B ...), median of
per-round ratios; outputs compared (max |diff| / max |original|) first.

    .venv/bin/python bench/sliding_window_model.py [--seq 4096] [--window 512] [--reps 7] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(seq: int, window: int, layers: int, impl: str):
    from transformers import MistralConfig, MistralModel

    from zoo.sharpen import sharpen_

    cfg = MistralConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max(seq, 4096),
                        sliding_window=window, attn_implementation=impl, return_dict=False, use_cache=False)
    m = MistralModel(cfg).float().eval()
    sharpen_(m, seed=0)
    ids = torch.randint(3, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    return m, {"input_ids": ids}


def first(out):
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--impl", nargs="+", default=["sdpa", "eager"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import attnopt

    rows = []
    for impl in a.impl:
        model, inputs = build(a.seq, a.window, a.layers, impl)
        t = time.perf_counter()
        with torch.no_grad():
            result = attnopt.optimize(model, inputs)
        optimize_s = time.perf_counter() - t
        opt = result.model
        with torch.no_grad():
            ref, got = first(model(**inputs)), first(opt(**inputs))
            err = float((ref.double() - got.double()).abs().max() / ref.double().abs().max())
            times = {"original": [], "attnopt": []}
            for _ in range(a.reps):
                for name, fn in (("original", model), ("attnopt", opt)):
                    t = time.perf_counter()
                    fn(**inputs)
                    times[name].append(time.perf_counter() - t)
        row = {"impl": impl, "seq": a.seq, "window": a.window, "layers": a.layers,
               "sites_found": result.sites_found, "sites_rewritten": result.sites_rewritten,
               "variants": sorted({str(getattr(s, "variant", "")) for s in result.sites}),
               "optimize_s": round(optimize_s, 1), "rel_err": err,
               "ms": {n: round(statistics.median(ts) * 1e3, 1) for n, ts in times.items()},
               "speedup": statistics.median(o / n for o, n in zip(times["original"], times["attnopt"]))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
