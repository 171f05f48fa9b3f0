"""The fuzzer's grammar: the choices a case is made of, how they are drawn, and their check.

A case is a dict of plain JSON values (`sample`), so a case file replays exactly. Case files are
data, and the torch programs are Python source built from the choices, so `check_choices`
(known keys only, each string from its set, each size an int in range) runs before any source
is generated: anything else (code pasted into a choice, say) is `BadCase`, exit 2, nothing run.
`expectation` says what attnopt must do with a case: find a site, reject it, or either.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from attnopt.errors import BadArgument

SCALES = ["scores_mul", "scores_div", "q_mul", "q_div", "k_mul", "split_sqrt", "none"]
KTRANS = ["transpose", "transpose_rev", "transpose_pos", "permute", "pretransposed"]
PRODUCTS = ["matmul", "torch_matmul", "einsum", "bmm", "baddbmm"]
MASKS = ["none", "pad_add", "pad_fill", "causal_where", "causal_triu_fill", "causal_arange",
         "causal_buffer_slice", "sliding", "block", "bias", "dense_input"]
FILLS = ["-inf", "finfo_min", "large_neg"]
SOFTMAX = ["torch_softmax", "F_softmax", "method", "dim3"]
GQA = ["none", "repeat_kv", "repeat_interleave", "broadcast"]
LAYOUTS = ["bhsd", "bshd", "proj"]
NEAR = ["none", "softmax_axis", "probs_returned", "scores_returned", "nonconst_scale",
        "contract_query", "extra_op_probs", "extra_op_scores", "mask_per_batch",
        "mask_expands", "dynamic_seq"]
# near misses that must produce no site; the others may, but then must match
REJECT = {"softmax_axis", "probs_returned", "scores_returned", "nonconst_scale",
          "contract_query", "extra_op_probs", "extra_op_scores"}
ONNX_SCALES = ["scores_mul", "scores_div", "q_mul", "split_sqrt", "none"]
ONNX_KTRANS = ["transpose", "bshd_permute", "pretransposed"]
ONNX_MASKS = ["none", "pad_add", "pad_bool", "causal_where", "causal_add", "sliding", "bias", "dense_input"]
ONNX_GQA = ["none", "expand", "tile"]
ONNX_NEAR = ["none", "softmax_axis", "probs_returned", "nonconst_scale", "contract_query",
             "extra_op_probs", "dynamic_seq"]
ONNX_REJECT = {"softmax_axis", "probs_returned", "nonconst_scale", "contract_query",
               "extra_op_probs"}

# Every choice a case may hold, with its allowed values (check_choices): a set of values, or
# (lo, hi) for an int. Sizes are bounded beyond what `sample` draws (hand-made cases may be a
# little larger) but stay small: a case is a tiny program.
_COMMON: dict[str, Any] = {
    "kind": {"torch", "onnx"}, "seed": (0, 2 ** 31 - 1), "odd": bool, "B": (1, 8), "H": (1, 16),
    "KVH": (1, 16), "S": (1, 64), "Sk": (1, 128), "D": (1, 64), "Dv": (1, 128), "v_dim": bool,
    "cross": bool, "dtype": {"float16", "float32"}, "scale_value": {"inv_sqrt_d", "0.3", "1/8"},
    "nan_guard": bool, "softcap": bool, "fill": set(FILLS)}
_TORCH: dict[str, Any] = {
    **_COMMON, "capture": {"export", "symbolic_trace"}, "near": set(NEAR), "layout": set(LAYOUTS),
    "product": set(PRODUCTS), "ktrans": set(KTRANS), "scale": set(SCALES) | {"alpha"},
    "mask": set(MASKS), "softmax": set(SOFTMAX), "gqa": set(GQA),
    "cast": {"none", "float_cast", "dtype_arg"}, "dropout": {"none", "F_dropout", "module"},
    "normalizer": {"softmax", "sigmoid"}, "window": (1, 64)}
_ONNX: dict[str, Any] = {
    **_COMMON, "near": set(ONNX_NEAR), "layout": {"bhsd", "proj"}, "ktrans": set(ONNX_KTRANS),
    "scale": set(ONNX_SCALES), "mask": set(ONNX_MASKS), "gqa": set(ONNX_GQA),
    "cast": {"none", "float_cast"}, "dropout": {"none"}, "normalizer": {"softmax"},
    "opset": {17, 18, 20}}
_OPTIONAL = {"window"}  # every other key is required


class BadCase(BadArgument, ValueError):
    """A fuzz case that is not one the grammar can produce: exit code 2, nothing run."""


def check_choices(c: Any) -> dict[str, Any]:
    """`c` itself when every key is a grammar choice and every value one of its allowed values;
    BadCase naming the first bad one otherwise. Run before any source is generated."""
    if not isinstance(c, dict):
        raise BadCase(f"case choices must be an object, not {type(c).__name__}")
    kind = c.get("kind")
    if not isinstance(kind, str) or kind not in ("torch", "onnx"):
        raise BadCase(f"case choice 'kind': {_short(kind)} is not one of onnx, torch")
    allowed = _TORCH if kind == "torch" else _ONNX
    for k in c:
        if k not in allowed:
            raise BadCase(f"case choice {_short(k)}: not a {kind} grammar choice")
    for k, rule in allowed.items():
        if k not in c:
            if k in _OPTIONAL:
                continue
            raise BadCase(f"case choice {k!r}: missing")
        v = c[k]
        if rule is bool:
            ok = isinstance(v, bool)
            want = "true or false"
        elif isinstance(rule, tuple):
            ok = type(v) is int and rule[0] <= v <= rule[1]
            want = f"an integer in [{rule[0]}, {rule[1]}]"
        else:
            ok = type(v) in (str, int) and v in rule
            want = "one of " + ", ".join(sorted(map(str, rule)))
        if not ok:
            raise BadCase(f"case choice {k!r}: {_short(v)} is not {want}")
    if c["H"] % c["KVH"]:
        raise BadCase(f"case choice 'KVH': {c['KVH']} does not divide H = {c['H']}")
    return c


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def load_case(path: str | Path) -> dict[str, Any]:
    """The checked choices of a case file; BadCase (one line) for a file that cannot be read,
    is not JSON, holds no "choices" object, or holds a choice outside the grammar."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CASE_BYTES + 1)
    except OSError as e:
        raise BadCase(f"cannot read case {path}: {e.strerror or e}") from None
    if len(data) > MAX_CASE_BYTES:
        raise BadCase(f"case {path} is larger than {MAX_CASE_BYTES} bytes: not a fuzz case")
    try:
        case = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadCase(f"case {path} is not JSON: {getattr(e, 'msg', type(e).__name__)}") from None
    if not isinstance(case, dict) or "choices" not in case:
        raise BadCase(f"case {path} has no \"choices\" object")
    try:
        return check_choices(case["choices"])
    except BadCase as e:
        raise BadCase(f"case {path}: {e}") from None


MAX_CASE_BYTES = 1 << 20

# The grammar keys that make a "form"; distinct (key, value) pairs exercised are reported.
FORM_KEYS = ("kind", "capture", "layout", "scale", "ktrans", "product", "mask", "fill", "softmax",
             "cast", "dtype", "gqa", "dropout", "nan_guard", "softcap", "normalizer", "near",
             "odd", "v_dim")


def sample(rng: random.Random, kind: str) -> dict[str, Any]:
    """One program's grammar choices (plain JSON values, so a case file replays exactly)."""
    c: dict[str, Any] = {"kind": kind, "seed": rng.randrange(2 ** 31)}
    odd = rng.random() < 0.5
    c["odd"] = odd
    c["B"] = rng.choice([1, 2, 3])
    c["H"] = rng.choice([2, 3, 4] if not odd else [1, 3, 5])
    c["S"] = rng.choice([4, 8, 12, 16] if not odd else [1, 5, 7, 13])
    c["D"] = rng.choice([4, 8, 16] if not odd else [3, 5, 12])
    c["v_dim"] = rng.random() < 0.1
    c["Dv"] = c["D"] + rng.choice([2, 4]) if c["v_dim"] else c["D"]
    c["cross"] = rng.random() < 0.15
    c["Sk"] = c["S"] + rng.choice([1, 3, 6]) if c["cross"] else c["S"]
    c["dtype"] = "float16" if rng.random() < 0.15 else "float32"
    c["scale_value"] = rng.choice(["inv_sqrt_d", "0.3", "1/8"])
    if kind == "torch":
        _sample_torch(rng, c)
    else:
        _sample_onnx(rng, c)
    return c


def _sample_torch(rng: random.Random, c: dict[str, Any]) -> None:
    c["capture"] = "export" if rng.random() < 0.05 else "symbolic_trace"
    c["near"] = rng.choice(NEAR) if rng.random() < 0.25 else "none"
    c["layout"] = rng.choice(LAYOUTS)
    c["product"] = rng.choice(PRODUCTS)
    c["ktrans"] = rng.choice(KTRANS)
    c["scale"] = rng.choice(SCALES + (["alpha"] if c["product"] == "baddbmm" else []))
    c["mask"] = rng.choice(MASKS)
    c["fill"] = rng.choice(FILLS)
    c["softmax"] = rng.choice(SOFTMAX)
    c["gqa"] = rng.choice(GQA) if rng.random() < 0.3 else "none"
    c["cast"] = rng.choice(["none", "float_cast", "dtype_arg"]) if c["dtype"] == "float16" else "none"
    c["dropout"] = rng.choice(["none", "none", "F_dropout", "module"])
    c["nan_guard"] = rng.random() < 0.15
    c["softcap"] = rng.random() < 0.1
    c["normalizer"] = "sigmoid" if rng.random() < 0.08 else "softmax"
    _normalize_torch(c)


def _normalize_torch(c: dict[str, Any]) -> None:
    """Drop combinations that do not describe a program (not a detection question)."""
    H = c["H"]
    if c["near"] == "mask_expands":
        c["layout"] = "bhsd"
        if c["product"] == "einsum":
            c["product"] = "matmul"
        if c["ktrans"] == "permute":
            c["ktrans"] = "transpose"
    if c["layout"] == "proj":
        c["cross"], c["Sk"] = False, c["S"]
        if c["v_dim"]:
            c["v_dim"], c["Dv"] = False, c["D"]
    if c["gqa"] != "none":
        kvh = [d for d in range(1, H) if H % d == 0]
        if not kvh:
            c["gqa"] = "none"
        else:
            c["KVH"] = 1 if c["gqa"] == "broadcast" else max(kvh)
    c["KVH"] = c.get("KVH", H) if c["gqa"] != "none" else H
    if c["product"] in ("bmm", "baddbmm"):
        if c["gqa"] == "broadcast":
            c["gqa"] = "repeat_kv"
        if c["mask"] in ("pad_add", "pad_fill", "dense_input") or c["near"] in (
                "mask_per_batch", "mask_expands"):
            c["mask"] = "causal_where" if c["mask"] != "none" else "none"
            if c["near"] in ("mask_per_batch", "mask_expands"):
                c["near"] = "none"
        if c["scale"] == "alpha" and c["product"] != "baddbmm":
            c["scale"] = "scores_mul"
    if c["product"] == "einsum" and c["gqa"] == "broadcast":
        c["gqa"] = "repeat_kv"
    structural = c["mask"] in ("causal_where", "causal_triu_fill", "causal_arange",
                               "causal_buffer_slice", "sliding", "block")
    if c["cross"] and (structural or c["near"] == "contract_query"):
        c["cross"], c["Sk"] = False, c["S"]
    if c["normalizer"] == "sigmoid":
        c["cast"] = "none"
        if c["near"] == "softmax_axis":
            c["near"] = "none"
    if c["near"] == "contract_query" and c["v_dim"]:
        c["v_dim"], c["Dv"] = False, c["D"]
    if c["near"] == "nonconst_scale" and c["scale"] == "none":
        c["scale"] = "scores_mul"
    if c["layout"] == "bshd" and c["ktrans"] == "pretransposed":
        c["ktrans"] = "transpose"
    if c["layout"] == "proj" and c["ktrans"] == "pretransposed":
        c["ktrans"] = "permute"
    if c["near"] == "dynamic_seq":
        c["capture"] = "export"
        c.update(layout="bhsd", product=rng_choice(c, ["matmul", "einsum"]), cross=False)
        c["Sk"] = c["S"] = max(c["S"], 2)
        if c["gqa"] in ("repeat_kv",):
            c["gqa"] = "repeat_interleave"
        if c["mask"] not in ("none", "pad_add", "pad_fill", "dense_input"):
            c["mask"] = "none"
        if c["ktrans"] == "permute":
            c["ktrans"] = "transpose"


def rng_choice(c: dict[str, Any], options: list[Any]) -> Any:
    return options[c["seed"] % len(options)]


def _sample_onnx(rng: random.Random, c: dict[str, Any]) -> None:
    c["near"] = rng.choice(ONNX_NEAR) if rng.random() < 0.25 else "none"
    c["layout"] = rng.choice(["bhsd", "proj"])
    c["ktrans"] = rng.choice(ONNX_KTRANS)
    c["scale"] = rng.choice(ONNX_SCALES)
    c["mask"] = rng.choice(ONNX_MASKS)
    c["fill"] = rng.choice(FILLS)
    c["gqa"] = rng.choice(ONNX_GQA) if rng.random() < 0.3 else "none"
    c["cast"] = rng.choice(["none", "float_cast"]) if c["dtype"] == "float16" else "none"
    c["nan_guard"] = rng.random() < 0.15
    c["softcap"] = rng.random() < 0.1
    c["dropout"] = "none"
    c["opset"] = rng.choice([17, 18, 20])
    c["normalizer"] = "softmax"
    H = c["H"]
    if c["layout"] == "proj":
        c["cross"], c["Sk"], c["v_dim"], c["Dv"] = False, c["S"], False, c["D"]
        if c["ktrans"] == "pretransposed":
            c["ktrans"] = "transpose"
    if c["gqa"] != "none":
        kvh = [d for d in range(1, H) if H % d == 0]
        c["gqa"] = c["gqa"] if kvh else "none"
        c["KVH"] = max(kvh) if kvh else H
    c["KVH"] = c.get("KVH", H) if c["gqa"] != "none" else H
    if c["cross"] and (c["mask"] in ("causal_where", "causal_add", "sliding", "pad_bool")
                       or c["near"] == "contract_query"):
        c["cross"], c["Sk"] = False, c["S"]
    if c["near"] == "contract_query" and c["v_dim"]:
        c["v_dim"], c["Dv"] = False, c["D"]
    if c["near"] == "nonconst_scale" and c["scale"] == "none":
        c["scale"] = "scores_mul"


def forms(c: dict[str, Any]) -> set[tuple[str, Any]]:
    """The (key, value) pairs of FORM_KEYS the case exercises (counted in the summary)."""
    return {(k, c[k]) for k in FORM_KEYS if k in c}


def expectation(c: dict[str, Any]) -> str:
    """'site' (must be found and match), 'reject' (no site) or 'either' (none, or a match)."""
    near = c.get("near", "none")
    if c.get("product") == "baddbmm" and c.get("mask") != "none" and (
            c.get("softcap") or c.get("scale") in ("scores_mul", "scores_div")):
        return "either"  # the bias is softcapped/scaled with the scores: not a mask any more
    if near == "none":
        return "site"
    if near == "contract_query" and c.get("normalizer") == "sigmoid":
        # sigmoid is elementwise: sigmoid(q kᵀ)ᵀ @ v is sigmoid attention with q and k swapped,
        # a real form (it must then match numerically).
        return "either"
    return "reject" if near in (REJECT if c["kind"] == "torch" else ONNX_REJECT) else "either"


def scale_value(c: dict[str, Any]) -> float:
    """The softmax scale the case's "scale_value" choice names (torch and ONNX programs)."""
    return {"inv_sqrt_d": c["D"] ** -0.5, "0.3": 0.3, "1/8": 0.125}[c["scale_value"]]
