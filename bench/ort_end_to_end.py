"""End to end in ONNX Runtime (CPU): BERT-base and ViT-B/16 shaped models, original export vs
attnopt vs the two fusers people use today.

Models (transformers, from configs, eager attention, sharpened random weights, batch 1):
  bert: BertModel, 12 layers, hidden 768, 12 heads, intermediate 3072, max positions 2048,
        inputs input_ids + attention_mask (the last quarter of the tokens padded), seq 128/512/2048
  vit:  ViTModel, 224x224 image, patch 16 (197 tokens), 12 layers, hidden 768, 12 heads
Exports: dynamo exporter (default opset) and TorchScript exporter (opset 17), static shapes.
Variants of each export:
  original          the export as written
  attnopt-ort       `attnopt optimize IN -o OUT --onnx-op ort`       (com.microsoft.MultiHeadAttention)
  attnopt-standard  `attnopt optimize IN -o OUT --onnx-op standard`  (opset-23 Attention)
  ort-transformers  onnxruntime.transformers.optimizer.optimize_model(path, model_type, 12, 768)
  onnxscript        onnxscript.rewriter.ort_fusions.optimize_for_ort
Every variant is checked (onnx.checker full check, loads in ORT, outputs within REL_TOL of the
original's on the padded feed); a crash, an invalid or a wrong model is recorded as failed and not
timed. Timing: ORT CPU, fp32, intra_op_num_threads=2, default graph optimization level; all valid
variants of one case interleaved (A B C ... A B C ...), median per variant; ratio = original / variant.

    python bench/ort_end_to_end.py [--models bert vit] [--seq 128 512 2048] [--exports dynamo ts]
                                   [--workdir /tmp/attnopt_e2e] [--reps 20 10 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

REL_TOL = 1e-3  # of max |original output|; fp32 fusions move outputs by ~1e-6
FUSED = {("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
         ("", "Attention"), ("ai.onnx", "Attention")}
VARIANTS = ("original", "attnopt-ort", "attnopt-standard", "ort-transformers", "onnxscript")


# ---- models and exports ------------------------------------------------------------------

def build(model: str, seq: int):
    import torch

    from zoo.sharpen import sharpen_

    if model == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=max(2048, seq),
                         attn_implementation="eager", return_dict=False, use_cache=False)
        m = BertModel(cfg, add_pooling_layer=False)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, cfg.vocab_size, (1, seq), generator=g)
        am = torch.ones(1, seq, dtype=torch.long)
        am[0, seq - seq // 4:] = 0  # real padding, so no export shortcut drops the mask
        inputs = {"input_ids": ids, "attention_mask": am}
    else:
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, intermediate_size=3072,
                        attn_implementation="eager", return_dict=False)
        m = ViTModel(cfg, add_pooling_layer=False)
        inputs = {"pixel_values": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    m = m.float().eval()
    sharpen_(m, seed=0)
    return m, inputs


def _wrap(model, names):
    import torch

    class Positional(torch.nn.Module):
        """Positional inputs by name, first output only (last hidden state)."""

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *args):
            out = self.inner(**dict(zip(names, args)))
            return out[0] if isinstance(out, (tuple, list)) else out

    return Positional().eval()


def export(model: str, seq: int, exporter: str, workdir: Path) -> Path:
    import torch

    path = workdir / f"{model}{seq}_{exporter}" / "original.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    m, inputs = build(model, seq)
    w = _wrap(m, list(inputs))
    tmp = path.with_name("tmp.onnx")
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(w, tuple(inputs.values()), str(tmp), input_names=list(inputs),
                              output_names=["last_hidden_state"], dynamo=True, external_data=False,
                              verbose=False)
        else:
            torch.onnx.export(w, tuple(inputs.values()), str(tmp), input_names=list(inputs),
                              output_names=["last_hidden_state"], dynamo=False, opset_version=17,
                              do_constant_folding=True)
    os.replace(tmp, path)
    np.savez(path.with_name("feeds.npz"), **{k: v.numpy() for k, v in inputs.items()})
    print(f"  exported {path} ({exporter}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ---- variants ------------------------------------------------------------------------------

def make_variant(name: str, model: str, src: Path) -> tuple[Path | None, str, float]:
    """(path or None, failure reason or "", seconds)."""
    out = src.with_name(f"{name}.onnx")
    status = src.with_name(f"{name}.status.json")
    if status.exists():
        st = json.loads(status.read_text())
        return (out if st["ok"] else None), st["reason"], st["seconds"]
    t0 = time.perf_counter()
    reason = ""
    try:
        if name.startswith("attnopt-"):
            op = name.split("-", 1)[1]
            exe = Path(sys.executable).with_name("attnopt")
            cmd = [str(exe), "optimize", str(src), "-o", str(out), "--onnx-op", op, "--json"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                reason = f"rc={p.returncode}: {(p.stderr.strip() or p.stdout.strip())[-400:]}"
            else:
                src.with_name(f"{name}.report.json").write_text(p.stdout)
        elif name == "ort-transformers":
            from onnxruntime.transformers.optimizer import optimize_model

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                om = optimize_model(str(src), model_type="bert" if model == "bert" else "vit",
                                    num_heads=12, hidden_size=768)
            om.save_model_to_file(str(out), use_external_data_format=False)
        elif name == "onnxscript":
            from onnxscript import ir
            from onnxscript.rewriter.ort_fusions import optimize_for_ort

            m = ir.load(str(src))
            m, counts = optimize_for_ort(m)
            ir.save(m, str(out))
            src.with_name("onnxscript.counts.json").write_text(json.dumps(counts))
    except Exception as e:  # a competitor's crash is a result, not an error of this script
        tb = traceback.format_exc(limit=-1).strip().splitlines()
        reason = f"crashed: {type(e).__name__}: {str(e)[:300]} [{tb[-2].strip() if len(tb) > 1 else ''}]"
    secs = time.perf_counter() - t0
    if not reason and not out.exists():
        reason = "no output written"
    if reason:
        reason = "failed: " + reason
    status.write_text(json.dumps({"ok": not reason, "reason": reason, "seconds": secs}))
    return (None if reason else out), reason, secs


def fused_count(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(((n.domain or ""), n.op_type) in FUSED for n in m.graph.node)


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # sessions are alternated: no spin-waiting, or one's idle threads starve the next one
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # graph_optimization_level left at ORT's default (ORT_ENABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check(path: Path, feeds: dict, ref: np.ndarray) -> tuple[str, float]:
    """("" or failure reason, max relative error vs the original)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        return f"failed: invalid (onnx.checker): {str(e).splitlines()[0][:300]}", float("nan")
    try:
        s = session(path)
        y = s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})[0]
    except Exception as e:
        return f"failed: ORT cannot run it: {str(e).splitlines()[0][:300]}", float("nan")
    if y.shape != ref.shape:
        return f"failed: wrong output shape {y.shape} vs {ref.shape}", float("nan")
    rel = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
    if not np.isfinite(rel) or rel > REL_TOL:
        return f"failed: wrong outputs (max rel err {rel:.2e})", rel
    return "", rel


# ---- main -----------------------------------------------------------------------------------

def run_case(model: str, seq: int, exporter: str, workdir: Path, reps: int) -> dict:
    src = export(model, seq, exporter, workdir)
    feeds = dict(np.load(src.with_name("feeds.npz")))
    ref_sess = session(src)
    ref = ref_sess.run(None, {i.name: feeds[i.name] for i in ref_sess.get_inputs()})[0].astype(np.float64)
    del ref_sess
    case = {"model": model, "seq": seq, "export": exporter, "variants": {}}
    paths = {"original": src}
    for name in VARIANTS[1:]:
        p, reason, secs = make_variant(name, model, src)
        rel = float("nan")
        if p is not None:
            reason, rel = check(p, feeds, ref)
        case["variants"][name] = {"fused": fused_count(p) if p is not None else None,
                                  "status": reason or "ok", "max_rel_err": rel, "tool_seconds": secs}
        if not reason:
            paths[name] = p
        print(f"  {name:17} {'ok' if not reason else reason[:200]} "
              f"(fused {case['variants'][name]['fused']}, rel err {rel:.1e}, {secs:.0f} s)", flush=True)
    case["variants"]["original"] = {"fused": fused_count(src), "status": "ok", "max_rel_err": 0.0}
    sess = {k: session(p) for k, p in paths.items()}
    fd = {k: {i.name: feeds[i.name] for i in s.get_inputs()} for k, s in sess.items()}
    for k, s in sess.items():  # warm-up
        s.run(None, fd[k])
    times: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(reps):
        for k, s in sess.items():
            t0 = time.perf_counter()
            s.run(None, fd[k])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in case["variants"].items():
        if k in med:
            v["median_ms"] = med[k]
            v["ratio"] = med["original"] / med[k]
    case["reps"] = reps
    case["load"] = os.getloadavg()
    del sess
    return case


def fmt(case: dict) -> str:
    cells = []
    for name in VARIANTS[1:]:
        v = case["variants"][name]
        if "ratio" in v:
            cells.append(f"{v['ratio']:.2f}x ({v['fused']})")
        else:
            cells.append(v["status"])
    o = case["variants"]["original"]
    load = "/".join(f"{x:.1f}" for x in case["load"])
    return (f"| {case['model']} | {case['export']} | {case['seq']} | {o['median_ms']:.1f} ({o['fused']}) | "
            + " | ".join(cells) + f" | {case['reps']} | {load} |")


HEADER = ("| model | export | seq | original ms (fused) | attnopt-ort | attnopt-standard | "
          "ort-transformers | onnxscript | reps | load 1/5/15 |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["bert", "vit"])
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--exports", nargs="+", default=["dynamo", "ts"])
    ap.add_argument("--reps", type=int, nargs="+", default=[20, 10, 3],
                    help="interleaved repetitions per seq (the last value repeats); ViT uses the first")
    ap.add_argument("--workdir", default="/tmp/attnopt_e2e")
    ap.add_argument("--json", default=None)
    ap.add_argument("--clean", action="store_true", help="delete cached exports and variants first")
    args = ap.parse_args()
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    workdir = Path(args.workdir)
    if args.clean and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, onnxscript {onnxscript.__version__}; ORT CPU fp32, 2 threads, "
          f"default graph optimizations; ratio = original median / variant median; (n) = fused attention nodes",
          flush=True)
    cases = []
    for model in args.models:
        seqs = args.seq if model == "bert" else [197]
        for i, seq in enumerate(seqs):
            reps = args.reps[min(i, len(args.reps) - 1)] if model == "bert" else args.reps[0]
            for exporter in args.exports:
                print(f"{model} seq {seq} {exporter}", flush=True)
                case = run_case(model, seq, exporter, workdir, reps)
                cases.append(case)
                print(fmt(case), flush=True)
    print()
    print(HEADER)
    for c in cases:
        print(fmt(c))
    if args.json:
        Path(args.json).write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
