"""Check a rewritten ONNX model against the original in onnxruntime (CPU, 2 threads).

Inputs are generated from the graph's input types at the evaluator's probe sizes: floats
standard normal, token ids uniform below the vocabulary (the row count of the embedding table
an id input gathers from), attention-mask-like integer/bool inputs all ones, plus a second feed
set with padded rows (zeros at the end of row 0 and at the start of row 1), so masks matter,
and a third with a hole inside row 0 (a mask that is not one run of keys per row).
Errors: max |a - b| per output, and relative to the output's scale (max |original|). NaN in
both models at the same place counts as equal; NaN in one only is an infinite error.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

DEFAULT_VOCAB = 64
THREADS = 2


def _load(model: onnx.ModelProto | str | os.PathLike, base_dir: str | None):
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        return onnx.load(path, load_external_data=False), os.path.dirname(os.path.abspath(path))
    return model, base_dir


def session(model: onnx.ModelProto | str | os.PathLike, base_dir: str | None = None,
            threads: int = THREADS, optimize: bool = True):
    """An onnxruntime CPU session; external data is read from `base_dir` (a path's folder)."""
    import onnxruntime as ort

    proto, base_dir = _load(model, base_dir)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No spin-waiting after a run: callers keep two or more sessions alive and alternate them
    # (validation: original vs optimized; benchmarks: interleaved variants), and on a 2-core
    # machine one session's spinning threads starved the next one's (medians 4x off).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if base_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _original_runs(step):
    """Runs a step on the user's own model; if ONNX Runtime cannot do it, no rewrite can be
    validated: say so plainly (an UnsupportedModel, one line) instead of an internal error."""
    try:
        return step()
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        from attnopt.errors import UnsupportedModel

        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedModel("ONNX Runtime cannot run the input model, so no rewrite of it can be "
                               f"validated: {why}") from e


def _vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """input name -> rows of the smallest embedding table it indexes (through Cast/Identity)."""
    gp = model.graph
    inits = {t.name: t for t in gp.initializer}
    consts = {n.output[0]: n for n in gp.node if n.op_type == "Constant" and n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in gp.node:
        for x in n.input:
            users.setdefault(x, []).append(n)
    out: dict[str, int] = {}
    for inp in gp.input:
        frontier, seen = [inp.name], set()
        while frontier:
            v = frontier.pop()
            if v in seen:
                continue
            seen.add(v)
            for n in users.get(v, []):
                if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == v:
                    data = n.input[0]
                    rows = None
                    if data in inits and inits[data].dims:
                        rows = int(inits[data].dims[0])
                    elif data in consts:
                        t = next((a.t for a in consts[data].attribute if a.name == "value"), None)
                        rows = int(t.dims[0]) if t is not None and t.dims else None
                    if rows:
                        out[inp.name] = min(rows, out.get(inp.name, rows))
                elif n.op_type in ("Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
                    frontier.extend(o for o in n.output if o)
    return out


def _is_mask_name(name: str) -> bool:
    return "mask" in name.lower()


def generate_feeds(graph_or_model: Any, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One unpadded feed set, plus a padded one when the model has mask-like inputs."""
    from attnopt.frontends.onnx import load_onnx

    graph = graph_or_model
    if isinstance(graph_or_model, (onnx.ModelProto, str, os.PathLike)):
        graph = load_onnx(graph_or_model)
    model = graph.native_model
    base = graph.evaluator.default_feeds()
    vocab = _vocab_sizes(model)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    masks: list[str] = []
    for name, arr in base.items():
        arr = np.asarray(arr)
        if arr.dtype.kind in "iu":
            if _is_mask_name(name):
                feeds[name] = np.ones_like(arr)
                masks.append(name)
            else:
                hi = vocab.get(name, DEFAULT_VOCAB)
                feeds[name] = rng.integers(0, max(1, hi), size=arr.shape).astype(arr.dtype)
        elif arr.dtype == bool and _is_mask_name(name):
            feeds[name] = np.ones_like(arr)
            masks.append(name)
        else:
            feeds[name] = arr.copy()
    out = [feeds]
    padded = {k: v.copy() for k, v in feeds.items()}
    changed = False
    for name in masks:
        m = padded[name]
        if m.ndim >= 2 and m.shape[0] >= 2 and m.shape[-1] >= 2:
            n = max(1, m.shape[-1] // 4)
            m[0, ..., -n:] = 0
            m[1, ..., :n] = 0
            changed = True
    if changed:
        out.append(padded)
        # A hole inside row 0's keys: masks that are not one run per row take the other branch of
        # a guarded site (emit/ort_gqa.py), which must be checked too.
        holes = {k: v.copy() for k, v in feeds.items()}
        for name in masks:
            m = holes[name]
            if m.shape[-1] >= 3:
                m[0, ..., m.shape[-1] // 2] = 0
        out.append(holes)
    return out


def _errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf"), 0.0
    na, nb = np.isnan(a), np.isnan(b)
    if (na != nb).any():
        return float("inf"), float("inf"), 0.0
    ok = ~na
    fin = ok & np.isfinite(a)
    scale = float(np.abs(a[fin]).max()) if fin.any() else 0.0
    both_inf = ok & ~np.isfinite(a) & (a == b)
    diff = np.abs(np.where(both_inf | ~ok, 0.0, a - b))
    err = float(diff.max()) if diff.size else 0.0
    if np.isnan(err):
        err = float("inf")
    return err, err / scale if scale > 0 else err, scale


def compare_onnx(original: Any, rewritten: onnx.ModelProto,
                 feeds_list: Sequence[Mapping[str, np.ndarray]] | None = None, *,
                 base_dir: str | None = None, threads: int = THREADS) -> dict[str, Any]:
    """Run both models on every feed set; errors of the rewritten outputs vs the original's.

    original: a ModelProto, a path, or an attnopt Graph loaded from ONNX (its native model,
    base_dir and probe sizes are used). feeds_list: None generates them (`generate_feeds`).

    base_dir: where external data lives (defaults to the original path's folder); the
    rewritten model's external references are the original's.
    """
    graph = None
    if hasattr(original, "native_model"):  # an attnopt Graph loaded from ONNX
        graph = original
        original = graph.native_model
        base_dir = base_dir or getattr(graph, "base_dir", None)
    orig_proto, orig_dir = _load(original, base_dir)
    base_dir = base_dir or orig_dir
    if feeds_list is None:
        from attnopt.frontends.onnx import load_onnx

        if graph is None:
            graph = (load_onnx(original) if isinstance(original, (str, os.PathLike))
                     else load_onnx(orig_proto, base_dir=base_dir))
        feeds_list = generate_feeds(graph)
    s_a = _original_runs(lambda: session(orig_proto, base_dir, threads))
    s_b = session(rewritten, base_dir, threads)
    names = [o.name for o in s_a.get_outputs()]
    per: dict[str, dict[str, float]] = {n: {"max_abs_error": 0.0, "max_rel_error": 0.0, "scale": 0.0}
                                        for n in names}
    per_feed = []
    for feeds in feeds_list:
        fa = {i.name: feeds[i.name] for i in s_a.get_inputs()}
        fb = {i.name: feeds[i.name] for i in s_b.get_inputs()}
        ra = _original_runs(lambda: s_a.run(names, fa))
        rb = s_b.run(names, fb)
        worst = 0.0
        for n, a, b in zip(names, ra, rb):
            err, rel, scale = _errors(a, b)
            p = per[n]
            p["max_abs_error"] = max(p["max_abs_error"], err)
            p["max_rel_error"] = max(p["max_rel_error"], rel)
            p["scale"] = max(p["scale"], scale)
            worst = max(worst, rel)
        per_feed.append(worst)
    return {
        "max_abs_error": max((p["max_abs_error"] for p in per.values()), default=0.0),
        "max_rel_error": max((p["max_rel_error"] for p in per.values()), default=0.0),
        "per_output": per,
        "per_feed_rel_error": per_feed,
        "feeds": len(feeds_list),
    }


__all__ = ["compare_onnx", "generate_feeds", "session"]
