"""Diagnose a site the GPU validation reverts: compare each generated-kernel call (a Triton row of
the kernel table) with the exact path on the same inputs and describe the inputs (developer tool,
needs CUDA).

    python bench/diag/gpu_site_diff.py llama_sdpa bfloat16
"""
import dataclasses
import sys

import torch

sys.path.insert(0, "tests")
import attnopt  # noqa: E402
from attnopt.codegen import select  # noqa: E402
from attnopt.codegen.exact import exact_attention  # noqa: E402
from zoo import hf  # noqa: E402

name, dtype = sys.argv[1], getattr(torch, sys.argv[2])


def spy(row):
    def run(q, k, v, m, p, layout, request):
        out = row.run(q, k, v, m, p, layout, request)
        if layout is None:
            report(out, q, k, v, m, p)
        return out
    return dataclasses.replace(row, run=run)


def report(out, q, k, v, m, p):
    ex = exact_attention(q, k, v, m, p)
    o32 = exact_attention(q.float(), k.float(), v.float(), None if m is None else (m if m.dtype == torch.bool else m.float()), p)
    desc = None
    if m is not None:
        allowed = (m if m.dtype == torch.bool else m > -1e30).expand(q.shape[0], 1, q.shape[2], k.shape[2])
        desc = (tuple(m.shape), str(m.dtype), m.float().unique()[:4].tolist(), "dead rows", int((~allowed.any(-1)).sum()))
    e = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    print("CALL", p, tuple(q.shape), tuple(k.shape), "mask", desc, "kernel-vs-exact", round(e(out, ex), 5),
          "kernel-vs-fp32", round(e(out, o32), 5), "exact-vs-fp32", round(e(ex, o32), 5), flush=True)


select.TABLE = tuple(spy(c) if c.group == "triton" else c for c in select.TABLE)
zm = hf.build(name)
model = zm.model.to("cuda", dtype)
kw = {k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) for k, v in zm.kwargs.items()}
res = attnopt.optimize(model, kw)
print([(s.name, s.status, s.error, s.reason) for s in res.sites])
