"""optimize() for ONNX models: each provable site becomes one fused node, validated in ONNX
Runtime against the original; a site whose output moves beyond noise is reverted."""
from __future__ import annotations

from typing import Any

from attnopt.frontends.onnx import load_onnx
from attnopt.passes.detect import detect
from attnopt.passes.rewrite import Recipe, key_padding_flags, plan_all
from attnopt.pipeline.result import OptimizeResult, SiteResult
from attnopt.ir.vocab import TOLERANCE_FP32 as TOLERANCE  # relative to the output's scale
from attnopt.ir.vocab import TOLERANCE_HALF as HALF_TOLERANCE  # fp16/bf16 outputs round differently


def tolerance_for_model(model: Any) -> float:
    """1e-2 when any graph output is half precision, else 1e-4 (same rule as validate.py)."""
    half = {10, 16}  # TensorProto.FLOAT16, BFLOAT16
    outs = getattr(getattr(model, "graph", None), "output", [])
    return HALF_TOLERANCE if any(o.type.tensor_type.elem_type in half for o in outs) else TOLERANCE


def optimize_onnx_model(model: Any, *, op: str = "ort", validate: bool = True) -> OptimizeResult:
    from functools import partial

    from attnopt.emit.onnx import attention_ops, splice, splice_report
    from attnopt.pipeline.validate_onnx import compare_onnx

    if op not in ("ort", "standard"):
        from attnopt.errors import UnsupportedModel

        raise UnsupportedModel(f"--onnx-op must be 'ort' or 'standard', got {op!r}")
    graph = load_onnx(model)
    sites, rejected = detect(graph)
    recipes, reasons = plan_all(graph, sites)
    plain = {r.site: r for r in recipes}  # each site's recipe with its masks as the model writes them
    if op == "ort":  # causal + key mask: MHA's unidirectional flag, the mask folded into q and k (emit/ort.py)
        recipes = key_padding_flags(graph, sites, recipes, windows=False)
    results: dict[str, SiteResult] = {
        s.name: SiteResult(s.name, s.pattern, "kept", None, reasons[s.name], s.spec)
        for s in sites if s.name in reasons}
    original = graph.native_model
    # Sites the chosen fused node cannot express (e.g. sigmoid, softcap on MHA) stay as they are;
    # a standard Attention node already is the node `--onnx-op standard` asks for.
    # Causal sites with padding may run GroupQueryAttention behind a run-time check (emit/ort_gqa.py).
    gqa = frozenset(s.name for s in sites if getattr(getattr(s.spec, "mask", None), "kind", None) == "causal"
                    and s.spec.mask.padding)
    skipped = splice_report(graph, recipes, op=op, gqa_sites=gqa).skipped
    if op == "standard":
        skipped.update({r.site: "already the standard Attention op" for r in recipes
                        if _is_standard_attention(graph, r.site, sites)})
    spec_of = {s.name: s for s in sites}
    for name, reason in skipped.items():
        results[name] = SiteResult(name, spec_of[name].pattern, "kept", None, reason,
                                   spec_of[name].spec)
    kept = [r for r in recipes if r.site not in skipped]
    tol = tolerance_for_model(original)
    new_model, err = original, {"max_abs_error": 0.0, "max_rel_error": 0.0}
    while kept:
        new_model = splice(graph, kept, op=op, gqa_sites=gqa)
        if not validate:
            break
        err = compare_onnx(graph, new_model)
        if err["max_rel_error"] <= tol:
            break
        bad = _first_failing(graph, kept, op, compare_onnx, partial(splice, gqa_sites=gqa), tol)
        retry = plain.get(bad.site)
        if retry is not None and retry != bad and bad.site not in splice_report(graph, [retry], op=op,
                                                                                 gqa_sites=gqa).skipped:
            # The flags and key mask of key_padding_flags give rows with no key 0; a model whose
            # additive -inf mask makes them NaN fails here: its own dense mask instead.
            kept[kept.index(bad)] = retry
            continue
        results[bad.site] = SiteResult(bad.site, spec_of[bad.site].pattern, "reverted", None,
                                       "validation failed in ONNX Runtime", spec_of[bad.site].spec)
        kept.remove(bad)
    if not kept:
        new_model, err = original, {"max_abs_error": 0.0, "max_rel_error": 0.0}
    fused_ops = attention_ops(new_model)
    for r in kept:
        # (a softcap site of an opset-23 model takes the standard Attention op even with op="ort")
        node_op = "|".join(sorted({t for name, t in fused_ops.items() if name.startswith(f"attnopt/{r.site}/")},
                                  reverse=True)) or ("com.microsoft.MultiHeadAttention" if op == "ort" else "Attention")
        results[r.site] = SiteResult(r.site, spec_of[r.site].pattern, "rewritten",
                                     err["max_rel_error"], "", spec_of[r.site].spec, variant=f"onnx:{node_op}")
    ordered = [results[s.name] for s in sites if s.name in results]
    res = OptimizeResult(model=new_model, sites=ordered, rejected=rejected,
                         max_abs_error=float(err["max_abs_error"]),
                         rel_error=float(err["max_rel_error"]))
    res.base_dir = getattr(graph, "base_dir", None)
    return res


def _is_standard_attention(graph, site: str, sites) -> bool:
    s = next(x for x in sites if x.name == site)
    return getattr(s.details, "flavor", None) == "onnx_attention"


def _first_failing(graph, kept, op, compare, splice, tol: float = TOLERANCE) -> Recipe:
    """The earliest site that fails on its own."""
    for r in kept:
        e = compare(graph, splice(graph, [r], op=op))
        if e["max_rel_error"] > tol:
            return r
    return kept[-1]


def write_onnx_atomically(model, out_path: str, base_dir: str | None = None) -> None:
    """Temporary files, full checker, ORT load, then rename: never a partial output (outputs.py)."""
    from pathlib import Path

    from attnopt.pipeline.outputs import write_onnx

    write_onnx(model, Path(out_path), base_dir)
