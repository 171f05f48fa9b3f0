"""Run every tile config of the generated kernels once, each in its own process (a kernel fault
such as a misaligned address poisons the whole CUDA context, so one process per config is the
only way to tell which config faults), and check the output against SDPA.

    python bench/gpu_config_probe.py [--jobs 8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CASES = {
    "dense": "dict(scale=0.088), None, 1",
    "causal": "dict(scale=0.088, causal=True), None, 1",
    "window": "dict(scale=0.088, window=(1023, 0)), None, 1",
    "gna2d": "dict(scale=0.088), GNALayout((64, 64), (16, 16)), 2",
    "gna2d_blocksparse": "dict(scale=0.088), GNALayout((64, 64), (16, 16), (16, 16)), 2",
    "gna3d": "dict(scale=0.088), GNALayout((16, 16, 16), (8, 8, 8)), 3",
}

CHILD = r'''
import sys, json, torch
from attnopt.codegen.triton import generator, launcher
from attnopt.codegen import select
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.sparsity.gna import dense_mask
from attnopt.ir import GNALayout
kw, layout, ndim = {case}
i = {index}
cfg = {explicit} or generator.candidate_configs("hopper", ndim)[i]
p = AttentionParams(**kw)
N = 4096
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
family, _ = select.triton_family(q, k, v, None, p, layout)
out = launcher.kernel_call(family, cfg, q, k, v, None, p, layout).run()
torch.cuda.synchronize()
mask = None if layout is None else torch.from_numpy(dense_mask(layout)).cuda()
ref = reference_attention(q.float(), k.float(), v.float(), mask, **p.kwargs())
print(json.dumps({{"config": cfg.to_json(), "err": (out.float() - ref).abs().max().item()}}))
'''


def probe(case: str, index: int, explicit: str = "None") -> dict:
    code = CHILD.format(case=CASES[case], index=index, explicit=explicit)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["ok"] = row["err"] < 0.05
    else:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
        row = {"ok": False, "error": tail[0][-200:] if tail else f"rc {proc.returncode}"}
    row.update(case=case, index=index)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--config", default=None, help="q,kv,warps,stages of one 1-D config to probe, e.g. 128,64,8,3")
    a = ap.parse_args()
    if a.config:
        bq, bk, w, st = (int(x) for x in a.config.split(","))
        explicit = f"generator.KernelConfig(({bq},), ({bk},), {w}, {st})"
        rows = [probe(c, 0, explicit) for c in a.cases]
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    from attnopt.codegen.triton import generator

    todo = []
    for case in a.cases:
        ndim = int(CASES[case].rsplit(",", 1)[1])
        todo += [(case, i) for i in range(len(generator.candidate_configs("hopper", ndim)))]
    with ThreadPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(lambda t: probe(*t), todo))
    for r in rows:
        print(json.dumps(r), flush=True)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} configs ok; failing: "
          + json.dumps([(r["case"], r.get("config", r["index"]), r.get("error", r.get("err"))) for r in bad]))


if __name__ == "__main__":
    main()
