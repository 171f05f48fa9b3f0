"""Detection and exact-rewrite coverage over ~115 architectures, in every form a
model reaches attnopt: the nn.Module, a torch.export program, and ONNX files from the TorchScript
exporter (opset 17) and the dynamo exporter (opset 23); "compile" is every graph dynamo hands a
torch.compile backend.

For each model and flavour: sites found, sites rewritten (ONNX: fused into MultiHeadAttention),
the validation error, the first reason a found site was kept and, where fewer sites than
expected were found, the first near miss's reason. Models come from tests/zoo/coverage_registry.py
(hf_wide: transformers; diffusers_wide: diffusers transformers, UNet, VAE; vision_wide: windowed /
rel-pos vision, audio, more text; tiny configs, random sharpened weights). A model or export that
fails is a row with its error; a row that runs past --timeout seconds is cut off (an error row too).

  PYTHONPATH=.:tests .venv/bin/python bench/coverage.py [--flavours module,compile,pt2,onnx_ts17,onnx_dynamo23]
      [--models a,b] [--json out.json] [--timeout 300]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


import attnopt  # noqa: E402
from zoo import flavours as fl  # noqa: E402
from zoo import coverage_registry as wide  # noqa: E402
from zoo.hf import ZooModel  # noqa: E402


class RowTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise RowTimeout("the row ran past --timeout")


def _headline(spec) -> dict:
    return {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "mask": spec.mask.kind,
            "padding": spec.mask.padding, "score_mods": [str(m) for m in spec.score_mods]}


def _where(e: BaseException) -> str:
    """Where the error was raised, and the innermost attnopt frame on the way (an error raised
    inside attnopt/ itself is a bug there; one raised in torch under attnopt's export is not)."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    root = str(Path(__file__).resolve().parents[1]) + "/"
    ours = [f for f in tb if f.filename.startswith(root + "attnopt/")]
    last = tb[-1]
    at = f"{last.filename.replace(root, '')}:{last.lineno}"
    return at if not ours or ours[-1] is last else f"{at} (via {ours[-1].filename.replace(root, '')}:{ours[-1].lineno})"


def one(name: str, flavour: str, tmp: str, timeout: int = 0) -> dict:
    row: dict = {"model": name, "flavour": flavour, "expected": wide.ALL[name].sites}
    t0 = time.perf_counter()
    if timeout:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
    try:
        model, kw = wide.build(name)
        if flavour == "module":
            results = [attnopt.optimize(model, kw)]
        elif flavour == "compile":  # every graph dynamo hands a backend
            results = [attnopt.optimize(gm, ex) for gm, ex in fl.via_compile(ZooModel(name, model, kw, []))]
        else:
            obj, _ = fl.export(ZooModel(name, model, kw, []), flavour, tmp)
            results = [attnopt.optimize(obj)]
        sites = [s for r in results for s in r.sites]
        fused = [s for s in sites if s.status != "rewritten" and s.pattern.startswith("fused:")]
        kept = [s for s in sites if s.status != "rewritten" and s not in fused]
        rejected = [rj for r in results for rj in r.rejected]
        row.update(found=len(sites), rewritten=sum(s.status == "rewritten" for s in sites),
                   already_fused=len(fused), rel_error=max((r.rel_error for r in results), default=0.0),
                   kept=kept[0].reason if kept else "",
                   missed=rejected[0].reason if rejected and len(sites) < row["expected"] else "",
                   first=_headline(sites[0].spec) if sites else None)
    except Exception as e:  # noqa: BLE001 - an export the exporter itself cannot do is a row too
        row.update(found=None, rewritten=None, rel_error=None, kept="",
                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}",
                   where=_where(e))
    finally:
        if timeout:
            signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavours", default="module,compile,pt2,onnx_ts17,onnx_dynamo23")
    ap.add_argument("--models", default=",".join(wide.NAMES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per row (0: none)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: merge earlier --json files (a later file's rows replace an earlier "
                         "one's for the same model and flavour), write --json and print the table")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    if a.merge:
        merged = {}
        for path in a.merge:
            for r in json.loads(Path(path).read_text()):
                merged[(r["model"], r["flavour"])] = r
        rows = [merged[(n, f)] for n in a.models.split(",") for f in a.flavours.split(",") if (n, f) in merged]
    else:
        tmp = tempfile.mkdtemp(prefix="attnopt_coverage_")
        for name in a.models.split(","):
            for flavour in a.flavours.split(","):
                r = one(name, flavour, tmp, a.timeout)
                rows.append(r)
                print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    flavours = a.flavours.split(",")
    print("\n| model | sites | " + " | ".join(flavours) + " |")
    print("|---|---|" + "---|" * len(flavours))
    by = {(r["model"], r["flavour"]): r for r in rows}
    for name in a.models.split(","):
        cells = []
        for f in flavours:
            r = by[(name, f)]
            cell = "fails: " + r["error"].split(":")[0] if r.get("error") else f"{r['found']} / {r['rewritten']}"
            cells.append(cell + (f" + {r['already_fused']} fused op" if r.get("already_fused") else ""))
        print(f"| {name} | {wide.ALL[name].sites} | " + " | ".join(cells) + " |")
    for f in flavours:
        fr = [r for r in rows if r["flavour"] == f and not r.get("error")]
        found = sum(r["found"] >= r["expected"] for r in fr)
        full = sum(r["rewritten"] + r["already_fused"] == r["found"] >= r["expected"] for r in fr)
        print(f"{f}: {len(fr)} of {len(a.models.split(','))} ran, all expected sites found in {found}, "
              f"every found site rewritten (or already a fused op) in {full}")


if __name__ == "__main__":
    main()
