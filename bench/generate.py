"""Generation on CPU (issue 20, part 5): greedy decode tokens/s of eager SDPA, torch.compile
(inductor) and torch.compile (attnopt backend: the rewrite, then inductor), in one run; and the
prefill of a ragged batch alone, left- and right-padded, against the same-shape unpadded causal
prefill, in the torch op (attnopt backend) and in ONNX Runtime (dynamo export fused by attnopt).

Model: a Llama-shaped decoder with random (sharpened) weights, hidden 512, 4 layers, 8 query heads
over 2 KV heads (GQA), head dim 64. Batches: 1, and 4 with ragged prompt lengths (S, 3S/4, S/2,
S/4 real tokens, left padded as generate needs). Decode tokens/s counts the new tokens of every
row over the time of the decode forwards only (each forward call is timed; the first is the
prefill); every mode runs one warm-up generate at the same shapes first (compilation), then
--runs timed ones, of which the fastest counts (with --interleave the modes take turns run by run).
Prefill: the three cases (unpadded, left, right) take turns call by call, fastest of --reps each.

    .venv/bin/python bench/generate.py                       # the issue's settings (long)
    .venv/bin/python bench/generate.py --prompts 512 --new-tokens 32 --skip-onnx

Writes bench/results/generate_<date>.json (--out to change) with the settings and every figure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def llama(max_len: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    from zoo.sharpen import sharpen_

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_len,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return sharpen_(LlamaForCausalLM(cfg)).eval()


def prompts(batch: int, length: int, vocab: int, side: str = "left"):
    """ids [batch, length] and attention_mask: row b has length * (4 - b) / 4 real tokens (batch 4),
    or all `length` (batch 1); pads on `side`."""
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    if batch > 1:
        for b in range(batch):
            pad = length - max(1, length * (batch - b) // batch)
            if pad and side == "left":
                am[b, :pad] = 0
            elif pad:
                am[b, length - pad:] = 0
    return ids.masked_fill(am == 0, 0), am


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


class Timed:
    """Wraps a forward; records each call's time (prefill first, then decode steps) on CLOCK: wall
    time, or with --clock cpu this process's CPU time (with --threads 1 on a shared host: the time
    neighbours take the core away is not counted)."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *a, **kw):
        t = CLOCK()
        out = self.fn(*a, **kw)
        self.times.append(CLOCK() - t)
        return out


def compiled_forward(model, mode: str, reset: bool = True):
    if mode == "eager":
        return model.forward
    if reset:
        torch._dynamo.reset()
    if mode == "inductor":
        return torch.compile(model.forward, backend="inductor")
    from attnopt.pipeline.backend import make_backend

    return torch.compile(model.forward, backend=make_backend(inner="inductor"))


def run_generate(model, fwd, ids, am, new: int, cache: str):
    orig = model.forward
    timed = Timed(fwd)
    model.forward = timed
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=am, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, **kw)
    finally:
        model.forward = orig
    return out, timed.times


def bench_decode(model, args, report):
    """Every mode warmed up (compiled) first, then --runs rounds in which each mode runs one timed
    generate in turn (with --interleave; else each mode's runs back to back after its warm-up), so
    a slow stretch of a shared host reaches every mode alike. The fastest run per mode counts."""
    rows = []
    for length in args.prompts:
        for batch in args.batches:
            ids, am = prompts(batch, length, args.vocab)
            torch._dynamo.reset()
            fwds, warm, runs = {}, {}, {mode: [] for mode in args.modes}
            for mode in args.modes:
                # dynamo keeps each backend's graphs apart (a backend guard), so the compiled modes
                # coexist when interleaved; without --interleave each mode starts from a reset
                fwds[mode] = compiled_forward(model, mode, reset=not args.interleave)
                t0 = time.perf_counter()
                # warm-up at the same shapes: a static cache is sized prompt + new tokens, so fewer
                # new tokens would mean other shapes and a recompile inside the timed run
                run_generate(model, fwds[mode], ids, am, args.new_tokens, args.cache)
                warm[mode] = time.perf_counter() - t0
                if not args.interleave:
                    runs[mode] = [run_generate(model, fwds[mode], ids, am, args.new_tokens, args.cache)
                                  for _ in range(args.runs)]
            for _ in range(args.runs if args.interleave else 0):
                for mode in args.modes:
                    runs[mode].append(run_generate(model, fwds[mode], ids, am, args.new_tokens, args.cache))
            ref = None
            for mode in args.modes:
                # the fastest of --runs timed generates (a run a neighbour slowed says nothing)
                out, times = min(runs[mode], key=lambda r: sum(r[1][1:]))
                decode = sum(times[1:])
                row = dict(prompt=length, batch=batch, mode=mode, cache=args.cache, clock=args.clock,
                           new_tokens=args.new_tokens, runs=args.runs, interleaved=args.interleave,
                           warmup_s=round(warm[mode], 2), prefill_s=round(times[0], 4),
                           decode_s=round(decode, 4),
                           decode_tokens_per_s=round(batch * (len(times) - 1) / decode, 2),
                           ms_per_step=round(1e3 * decode / max(1, len(times) - 1), 2),
                           ms_per_step_each_run=[round(1e3 * sum(t[1:]) / max(1, len(t) - 1), 2)
                                                 for _, t in runs[mode]])
                if ref is None:
                    ref = out
                row["tokens_equal_first_mode"] = all(bool(torch.equal(o, ref)) for o, _ in runs[mode])
                rows.append(row)
                print(json.dumps(row), flush=True)
                report["decode"] = rows


def best_times(fns: dict, reps: int) -> dict:
    """Fastest of `reps` timed calls per case after one warm-up call each; the cases take turns
    call by call, so drift in a shared host's speed reaches every case alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for case, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[case] = min(best[case], time.perf_counter() - t)
    return best


CASES = ("unpadded", "left", "right")


def case_inputs(case: str, length: int, vocab: int):
    """ids, attention_mask of the batch-4 prefill case: ragged left / right padded, or all real."""
    ids, am = prompts(4, length, vocab, "left" if case == "unpadded" else case)
    return ids, (torch.ones_like(am) if case == "unpadded" else am)


def bench_prefill_torch(model, args, report):
    """Prefill alone (use_cache=False), batch 4 ragged left / right padded vs all-real tokens,
    under the attnopt backend (inductor after the rewrite) and under eager SDPA."""
    rows = []
    for length in args.prefill_prompts:
        for mode in ("eager", "attnopt"):
            fwd = compiled_forward(model, mode)
            inputs = {case: case_inputs(case, length, args.vocab) for case in CASES}
            with torch.no_grad():
                res = best_times({case: (lambda ids=ids, am=am: fwd(input_ids=ids, attention_mask=am,
                                                                     use_cache=False))
                                  for case, (ids, am) in inputs.items()}, args.reps)
            row = dict(prompt=length, batch=4, mode=mode, **{f"{k}_s": round(v, 4) for k, v in res.items()},
                       left_over_unpadded=round(res["left"] / res["unpadded"], 3),
                       right_over_unpadded=round(res["right"] / res["unpadded"], 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
            report["prefill_torch"] = rows


def bench_prefill_onnx(model, args, report, tmp: Path):
    import onnxruntime as ort

    import attnopt

    class Prefill(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    t = time.perf_counter()
    if args.onnx_exporter == "torchscript":
        # fixed shapes: batch 4 at the one prefill length (the key mask is then folded into q and k)
        import onnx

        if len(args.prefill_prompts) != 1:
            raise SystemExit("--onnx-exporter torchscript exports at one length: give one --prefill-prompts")
        ids, am = prompts(4, args.prefill_prompts[0], args.vocab, "left")
        ts_path = tmp / "prefill_torchscript.onnx"
        torch.onnx.export(Prefill(model), (ids, am), str(ts_path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"])
        exported = onnx.load(str(ts_path))
    else:
        ids, am = prompts(4, 64, args.vocab, "left")
        dyn = torch.export.Dim.DYNAMIC
        exported = torch.onnx.export(Prefill(model), (ids, am), dynamo=True, verbose=False,
                                     dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}),
                                     input_names=["input_ids", "attention_mask"], output_names=["logits"]).model_proto
    res = attnopt.optimize(exported)
    report["onnx_export_and_optimize_s"] = round(time.perf_counter() - t, 1)
    report["onnx_sites_rewritten"] = res.sites_rewritten
    opts = ort.SessionOptions()
    if args.ort_denormal_zero:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    models = [("original", exported), ("attnopt", res.model)]
    if args.ort_unfolded:
        # diagnostic: the same rewrite with the key mask left as MultiHeadAttention's attention_bias
        # instead of folded into q and k (emit/ort.py key_bias), to see which costs follow the folding
        from unittest import mock

        from attnopt.emit import ort as ort_target

        with mock.patch.object(ort_target, "key_bias", lambda *a, **k: None):
            models.append(("attnopt_unfolded", attnopt.optimize(exported).model))
    sessions = {}
    for kind, proto in models:
        path = tmp / f"prefill_{kind}.onnx"
        path.write_bytes(proto.SerializeToString())
        sessions[kind] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    def feeds_for(case: str, length: int) -> dict:
        ids, am = case_inputs(case, length, args.vocab)
        return {"input_ids": ids.numpy(), "attention_mask": am.numpy()}

    rows = []
    for length in args.prefill_prompts:
        for kind, s in sessions.items():
            res_t = best_times({case: (lambda f=feeds_for(case, length): s.run(None, f)) for case in CASES},
                               args.reps)
            if args.ort_profile:
                report.setdefault("ort_profile", {})[f"{kind}/{length}"] = ort_op_profile(
                    tmp / f"prefill_{kind}.onnx", opts, {case: feeds_for(case, length) for case in CASES},
                    args.reps, args.ort_denormal_zero)
            row = dict(prompt=length, batch=4, runtime=f"ort/{kind}",
                       **{f"{k}_s": round(v, 4) for k, v in res_t.items()},
                       left_over_unpadded=round(res_t["left"] / res_t["unpadded"], 3),
                       right_over_unpadded=round(res_t["right"] / res_t["unpadded"], 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
            report["prefill_onnx"] = rows


def ort_op_profile(path: Path, opts, feeds_by_case: dict, reps: int, denormal_zero: bool = False) -> dict:
    """ONNX Runtime's own profile of `reps` runs per case (after one warm-up run): milliseconds per
    run by op type, the ten largest, and the session total, so where padding adds time shows."""
    import onnxruntime as ort

    out = {}
    for case, feeds in feeds_by_case.items():
        popts = ort.SessionOptions()
        popts.enable_profiling = True
        popts.profile_file_prefix = str(path.with_suffix("")) + f"_{case}"
        popts.intra_op_num_threads = opts.intra_op_num_threads
        if denormal_zero:
            popts.add_session_config_entry("session.set_denormal_as_zero", "1")
        sess = ort.InferenceSession(str(path), popts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        for _ in range(reps):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
        by_op: dict[str, float] = {}
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
        n = max(1, len(runs))  # warm-up included: every figure is a mean over the runs
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
        out[case] = dict(run_ms=round(sum(e["dur"] for e in runs) / 1e3 / n, 1),
                         ops_ms={op: round(ms / n, 1) for op, ms in top})
        print(json.dumps({"ort_profile": str(path.name), "case": case, **out[case]}), flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--prefill-prompts", type=int, nargs="+", default=None,
                    help="prompt lengths of the prefill comparison (default: --prompts)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["eager", "inductor", "attnopt"])
    ap.add_argument("--cache", choices=["static", "dynamic"], default="static")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1, help="timed generates per decode row (the fastest counts)")
    ap.add_argument("--interleave", action="store_true",
                    help="decode: the modes take turns run by run (after all are compiled)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="decode/prefill step times: wall clock, or this process's CPU time")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--ort-denormal-zero", action="store_true",
                    help="ONNX Runtime sessions flush denormals to zero (session.set_denormal_as_zero)")
    ap.add_argument("--ort-unfolded", action="store_true",
                    help="also time attnopt's ONNX model with the key mask as attention_bias (not folded)")
    ap.add_argument("--onnx-exporter", choices=["dynamo", "torchscript"], default="dynamo",
                    help="ONNX prefill: dynamo with dynamic batch and length, or TorchScript at one fixed length")
    ap.add_argument("--ort-profile", action="store_true",
                    help="also record ONNX Runtime's per-op-type profile of each prefill case")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.prefill_prompts = args.prefill_prompts or args.prompts
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"generate_{date}.json"
    report = dict(command=" ".join(["bench/generate.py"] + (argv if argv is not None else sys.argv[1:])),
                  date=date, torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.machine(), settings={k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in vars(args).items()})
    model = llama(max(args.prompts + args.prefill_prompts) + args.new_tokens + 8, args.vocab)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    try:
        if not args.skip_decode:
            bench_decode(model, args, report)
            save()
        if not args.skip_prefill:
            bench_prefill_torch(model, args, report)
            save()
        if not args.skip_onnx:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                bench_prefill_onnx(model, args, report, Path(tmp))
    finally:
        save()
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
