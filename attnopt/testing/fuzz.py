"""Graph fuzzer: attention-like programs from a grammar of the real forms, and near misses.

    python -m attnopt.testing.fuzz --cases N --seed S [--kind torch|onnx|both] [--time-limit SECONDS]
                           [--out DIR] [--replay CASE.json]

Each case is a dict of grammar choices (`sample`), turned into a tiny torch module (Python
source, traced with torch.fx.symbolic_trace, or captured with torch.export for a fraction) or
an ONNX graph built with onnx.helper. The invariant checked, independently of attnopt's own
validator (fresh random inputs, padded masks included):

- a positive form must produce a site, and the optimized program must match the original
  (1e-4 relative for fp32, 1e-2 for fp16);
- a near miss marked `reject` must produce no site; one marked `either` may produce a site, but
  then the optimized program must match.

A failure is written as `<out>/<kind>-<seed>-<index>.json` holding the choices; replay it with
`--replay` or `attnopt.testing.fuzz.run_case(json.load(...)["choices"])`.

Case files are data: the torch programs are Python source built from the choices, so every
choice is checked against the grammar's allowed values (`check_choices`: known keys only, each
string from its set, each size an int in range) before any source is generated. A case with
anything else (code pasted into a choice, say) is refused: `BadCase`, and `--replay` prints one
line and exits 2 without running anything.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnopt.errors import BadArgument

# ---- grammar -------------------------------------------------------------------------------

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


def _scale_value(c: dict[str, Any]) -> float:
    return {"inv_sqrt_d": c["D"] ** -0.5, "0.3": 0.3, "1/8": 0.125}[c["scale_value"]]


def _fill_value(c: dict[str, Any]) -> str:
    if c["fill"] == "-inf":
        return "float('-inf')"
    if c["fill"] == "finfo_min":
        return repr(-65504.0 if c["dtype"] == "float16" else -3.4028234663852886e38)
    return repr(-1e4 if c["dtype"] == "float16" else -1e9)


# ---- torch programs -------------------------------------------------------------------------

def torch_source(c: dict[str, Any]) -> str:
    """The forward() of the case as Python source (module attributes set up by `torch_case`).
    Only from choices the grammar allows (check_choices): the source is executed."""
    check_choices(c)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    dt = f"torch.{c['dtype']}"
    sc = _scale_value(c)
    near = c["near"]
    L: list[str] = []
    args = []
    three = c["product"] in ("bmm", "baddbmm")
    kt_ready = False  # k already [.., D, Sk]
    if c["layout"] == "proj":
        args = ["x"]
        L.append(f"q = self.wq(x).view({B}, {S}, {H}, {D}).transpose(1, 2)")
        if c["ktrans"] == "permute":
            L.append(f"k = self.wk(x).view({B}, {S}, {KVH}, {D}).permute(0, 2, 3, 1)")
            kt_ready = True
        else:
            L.append(f"k = self.wk(x).view({B}, {S}, {KVH}, {D}).transpose(1, 2)")
        L.append(f"v = self.wv(x).view({B}, {S}, {KVH}, {Dv}).transpose(1, 2)")
    elif c["layout"] == "bshd":
        args = ["q", "k", "v"]
        L.append("q = q.transpose(1, 2)")
        if c["ktrans"] == "permute":
            L.append("k = k.permute(0, 2, 3, 1)")
            kt_ready = True
        else:
            L.append("k = k.transpose(1, 2)")
        L.append("v = v.transpose(1, 2)")
    else:
        args = ["q", "k", "v"]
        if c["ktrans"] == "pretransposed":
            kt_ready = True
    if c["mask"] in ("pad_add", "pad_fill"):
        args.append("am")
    if c["mask"] == "dense_input":
        args.append("dm")
    if near == "nonconst_scale":
        args.append("t")
    # GQA: bring k/v to H heads (or leave broadcasting to matmul)
    kdim_s = -1 if kt_ready else -2  # which axis of k is the sequence

    def rep(name: str) -> None:
        n = H // KVH
        if c["gqa"] == "repeat_kv":
            if name == "k" and kt_ready:
                L.append(f"k = k[:, :, None].expand({B}, {KVH}, {n}, {D}, {Sk}).reshape({B}, {H}, {D}, {Sk})")
            else:
                d = D if name == "k" else Dv
                L.append(f"{name} = {name}[:, :, None].expand({B}, {KVH}, {n}, {Sk}, {d}).reshape({B}, {H}, {Sk}, {d})")
        elif c["gqa"] == "repeat_interleave":
            L.append(f"{name} = {name}.repeat_interleave({n}, dim=1)")
    if c["gqa"] in ("repeat_kv", "repeat_interleave"):
        rep("k")
        rep("v")
    # scale on q / k
    s = c["scale"]
    if s == "q_mul":
        L.append(f"q = q * {sc!r}")
    elif s == "q_div":
        L.append(f"q = q / {1 / sc!r}")
    elif s == "k_mul":
        L.append(f"k = k * {sc!r}")
    elif s == "split_sqrt":
        L.append(f"q = q * {math.sqrt(sc)!r}")
    # K^T
    if c["product"] == "einsum":
        kt = "k"
        if s == "split_sqrt":
            L.append(f"k = k * {math.sqrt(sc)!r}")
    else:
        if kt_ready:
            kt = "k"
        else:
            kt = {"transpose": "k.transpose(-2, -1)", "transpose_rev": "k.transpose(-1, -2)",
                  "transpose_pos": "k.transpose(2, 3)", "permute": "k.permute(0, 1, 3, 2)",
                  "pretransposed": "k.transpose(-2, -1)"}[c["ktrans"]]
        L.append(f"kt = {kt}")
        kt = "kt"
        if s == "split_sqrt":
            L.append(f"kt = kt * {math.sqrt(sc)!r}")
    # scores
    Hs = H if c["gqa"] != "broadcast" else H
    if c["product"] in ("matmul",):
        L.append(f"s = q @ {kt}")
    elif c["product"] == "torch_matmul":
        L.append(f"s = torch.matmul(q, {kt})")
    elif c["product"] == "einsum":
        spec = "bhqd,bhdk->bhqk" if kt_ready else "bhqd,bhkd->bhqk"
        L.append(f"s = torch.einsum('{spec}', q, k)")
    else:
        L.append(f"q3 = q.reshape({B * H}, {S}, {D})")
        L.append(f"kt3 = {kt}.reshape({B * H}, {D}, {Sk})")
        if c["product"] == "bmm":
            L.append("s = torch.bmm(q3, kt3)")
        else:
            alpha = sc if s == "alpha" else 1.0
            bias = "self.cbias" if c["mask"] != "none" else f"torch.zeros({S}, {Sk}, dtype={dt})"
            L.append(f"s = torch.baddbmm({bias}.expand({B * H}, {S}, {Sk}), q3, kt3, beta=1.0, alpha={alpha!r})")
    if s == "scores_mul":
        L.append(f"s = s * {'t' if near == 'nonconst_scale' else repr(sc)}")
    elif s == "scores_div":
        L.append(f"s = s / {'t' if near == 'nonconst_scale' else repr(1 / sc)}")
    elif near == "nonconst_scale":
        L.append("s = s * t")
    if c["softcap"]:
        L.append("s = torch.tanh(s / 30.0) * 30.0")
    if near == "extra_op_scores":
        L.append("s = s.abs()")
    # masks
    fill = _fill_value(c)
    m = c["mask"]
    baddbmm_masked = c["product"] == "baddbmm"
    if near == "mask_per_batch":
        L.append(f"s = torch.where(self.pbmask, s, {fill})")
    elif near == "mask_expands":
        L.append("s = s + self.xmask")
    elif baddbmm_masked:
        pass
    elif m == "pad_add":
        lo = "-65504.0" if c["dtype"] == "float16" else "-3.4028234663852886e38"
        L.append(f"s = s + (1.0 - am[:, None, None, :].to({dt})) * {lo}")
    elif m == "pad_fill":
        L.append(f"s = s.masked_fill(am[:, None, None, :] == 0, {fill})")
    elif m == "causal_where":
        L.append(f"s = torch.where(self.tril, s, {fill})")
    elif m == "causal_triu_fill":
        L.append(f"s = s.masked_fill(torch.triu(torch.ones({S}, {Sk}), diagonal=1).bool(), {fill})")
    elif m == "causal_arange":
        L.append(f"s = s.masked_fill(torch.arange({Sk})[None, :] > torch.arange({S})[:, None], {fill})")
    elif m == "causal_buffer_slice":
        big = "self.big[0, 0" if three else "self.big[:, :"
        L.append(f"s = torch.where({big}, :{S}, :{Sk}].bool(), s, {fill})")
    elif m == "sliding":
        L.append(f"i, j = torch.arange({S})[:, None], torch.arange({Sk})[None, :]")
        L.append(f"s = s.masked_fill(~((j <= i) & (i - j < {c.get('window', 3)})), {fill})")
    elif m == "block":
        L.append(f"blk = torch.arange({S}) // 4")
        L.append(f"s = s.masked_fill(blk[:, None] != blk[None, :], {fill})")
    elif m == "bias":
        L.append(f"s = s + self.bias.repeat({B}, 1, 1)" if three else "s = s + self.bias")
    elif m == "dense_input":
        L.append(f"s = torch.where(dm, s, {fill})")
    # normalizer
    ax = -2 if near == "softmax_axis" else -1
    if c["normalizer"] == "sigmoid":
        L.append(f"p = torch.sigmoid(s + {-math.log(Sk)!r})")
    else:
        src = "s"
        if c["cast"] == "float_cast":
            src = "s.float()"
        if c["cast"] == "dtype_arg":
            L.append(f"p = F.softmax(s, dim={ax}, dtype=torch.float32).to({dt})")
        else:
            sm = c["softmax"]
            if sm == "torch_softmax":
                L.append(f"p = torch.softmax({src}, {ax})")
            elif sm == "F_softmax":
                L.append(f"p = F.softmax({src}, dim={ax})")
            elif sm == "method":
                L.append(f"p = {src}.softmax({ax})")
            else:
                dim = (2 if three else 3) if ax == -1 else (1 if three else 2)
                L.append(f"p = torch.softmax({src}, dim={dim})")
            if c["cast"] == "float_cast":
                L.append(f"p = p.to({dt})")
    if c["nan_guard"]:
        L.append("p = torch.where(torch.isnan(p), 0.0, p)")
    if c["dropout"] == "F_dropout":
        L.append("p = F.dropout(p, 0.1, training=False)")
    elif c["dropout"] == "module":
        L.append("p = self.drop(p)")
    if near == "extra_op_probs":
        L.append("p = p * p")
    pp = "p.transpose(-2, -1)" if near == "contract_query" else "p"
    if three:
        L.append(f"v3 = v.reshape({B * H}, {Sk}, {Dv})")
        L.append(f"o = torch.bmm({pp}, v3).view({B}, {H}, {S}, {Dv})")
    elif c["product"] == "einsum":
        L.append(f"o = torch.einsum('bhqk,bhkd->bhqd', {pp}, v)")
    else:
        L.append(f"o = {pp} @ v")
    if c["layout"] in ("proj", "bshd"):
        L.append(f"o = o.transpose(1, 2).reshape({B}, {S}, {H * Dv})")
    ret = "o"
    if near == "probs_returned":
        ret = "o, p"
    elif near == "scores_returned":
        ret = "o, s"
    L.append(f"return {ret}")
    del Hs, kdim_s
    body = "\n".join("        " + x for x in L)
    return f"    def forward(self, {', '.join(args)}):\n{body}\n"


def _tensor_gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def torch_inputs(c: dict[str, Any], seed: int, pad: bool = True, empty_row: bool = False
                 ) -> list[Any]:
    """Inputs for the case; the padding mask pads a random number of trailing keys."""
    import torch

    g = _tensor_gen(seed)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    dt = getattr(torch, c["dtype"])

    def r(*shape):  # sharp attention: a wrong scale or mask moves the output (FACTS.md)
        return (torch.randn(*shape, generator=g) * 1.5).to(dt)
    out: list[Any] = []
    if c["layout"] == "proj":
        out.append(r(B, S, H * D))
    elif c["layout"] == "bshd":
        out += [r(B, S, H, D), r(B, Sk, KVH, D), r(B, Sk, KVH, Dv)]
    else:
        kt = r(B, KVH, D, Sk) if c["ktrans"] == "pretransposed" else r(B, KVH, Sk, D)
        out += [r(B, H, S, D), kt, r(B, KVH, Sk, Dv)]
    if c["mask"] in ("pad_add", "pad_fill"):
        am = torch.ones(B, Sk, dtype=torch.long)
        if pad:
            for b in range(B):
                n = int(torch.randint(1, Sk + 1, (1,), generator=g))
                am[b, n:] = 0
        out.append(am)
    if c["mask"] == "dense_input":
        dm = torch.rand(B, 1, S, Sk, generator=g) < 0.6
        dm[..., 0] = True
        if empty_row:  # one query that may attend to nothing
            dm[0, 0, 0, :] = False
        out.append(dm)
    if c["near"] == "nonconst_scale":
        out.append(torch.tensor(_scale_value(c), dtype=dt))
    return out


def torch_module(c: dict[str, Any]):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    check_choices(c)
    src = "class Case(nn.Module):\n" + torch_source(c)
    ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "math": math}
    exec(compile(src, f"<fuzz case {c['seed']}>", "exec"), ns)  # noqa: S102 - generated source
    m = ns["Case"]()
    g = _tensor_gen(c["seed"] + 1)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    dt = getattr(torch, c["dtype"])
    if c["layout"] == "proj":
        for name, o in (("wq", H * D), ("wk", KVH * D), ("wv", KVH * Dv)):
            lin = nn.Linear(H * D, o)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(o, H * D, generator=g) * 2 / math.sqrt(H * D))
            setattr(m, name, lin.to(dt))
    tril = torch.ones(S, Sk, dtype=torch.bool).tril()
    m.register_buffer("tril", tril)
    m.register_buffer("big", torch.ones(32, 32).tril().view(1, 1, 32, 32))
    m.register_buffer("bias", (torch.randn(H, S, Sk, generator=g) * 2).to(dt))
    neg = -65504.0 if c["dtype"] == "float16" else float("-inf")
    cb = torch.zeros(S, Sk).masked_fill(~tril, neg).to(dt) if c["mask"] != "none" else torch.zeros(S, Sk, dtype=dt)
    m.register_buffer("cbias", cb)
    pb = torch.stack([tril, torch.ones(S, Sk, dtype=torch.bool).triu()])[:, None]
    pb = pb[:B] if B <= 2 else torch.cat([pb, pb[:1]])[:B]
    m.register_buffer("pbmask", pb)
    m.register_buffer("xmask", (torch.randn(2, 1, 1, 1, Sk, generator=g)).to(dt))
    m.drop = nn.Dropout(0.1)
    return m.eval()


class _Prop:
    """Record every node's value in meta['example_value'] (what dynamo leaves on a graph)."""

    @staticmethod
    def run(gm, inputs) -> None:
        import torch
        import torch.fx as fx

        class P(fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                n.meta["example_value"] = r
                return r
        with torch.no_grad():
            P(gm).run(*inputs)


@dataclass
class Outcome:
    ok: bool
    sites: int = 0
    rewritten: int = 0
    message: str = ""
    skipped: bool = False
    reverted: int = 0  # sites found, then left alone by attnopt's own validation


def _max_rel(ref, got) -> float:
    import torch

    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    if len(ref) != len(got):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.double(), b.double()
        # NaN in the original (a query row with every key masked: 0/0) is undefined output;
        # attnopt's kernels return zeros there, like SDPA (the same rule as passes/validate.py).
        # NaN or Inf that the optimized program introduces where the original is finite, or an
        # Inf of the original that it does not reproduce, is a miscompile (inf - inf is NaN, and
        # max() would have dropped it).
        nan_a, inf_a = torch.isnan(a), torch.isinf(a)
        if bool(((torch.isfinite(a) & ~torch.isfinite(b)) | (inf_a & (b != a))).any()):
            return float("inf")
        same = nan_a | inf_a
        a, b = a.masked_fill(same, 0), b.masked_fill(same, 0)
        scale = max(a.abs().max().item() if a.numel() else 0.0, 1e-6)
        d = (a - b).abs().max().item() if a.numel() else 0.0
        r = d / scale
        worst = float("inf") if math.isnan(r) else max(worst, r)
    return worst


def _tol(c: dict[str, Any]) -> float:
    return 1e-2 if c["dtype"] == "float16" else 1e-4


def _site_expectation(c: dict[str, Any], report, res) -> Outcome | None:
    """A failure when the sites found contradict the grammar's expectation, else None."""
    n_sites, rew = len(report.sites), res.sites_rewritten
    exp = expectation(c)
    if res.sites_found != n_sites:
        return Outcome(False, n_sites, rew, f"inspect found {n_sites} sites, optimize {res.sites_found}")
    if exp == "site" and n_sites == 0:
        why = "; ".join(f"{r.node}: {r.reason}" for r in report.rejected)[:300]
        return Outcome(False, 0, 0, f"missed: a real attention form has no site ({why or 'no rejection'})")
    if exp == "reject" and n_sites:
        return Outcome(False, n_sites, rew, "near miss produced a site")
    return None


def run_torch(c: dict[str, Any]) -> Outcome:
    import torch

    import attnopt
    from attnopt.pipeline.optimize_torch import optimize_graph_module

    m = torch_module(c)
    inputs = torch_inputs(c, c["seed"] + 2)
    with torch.no_grad():
        try:
            m(*inputs)
        except Exception as e:  # noqa: BLE001 - the grammar made an invalid program
            return Outcome(False, message=f"generator: program does not run: {type(e).__name__}: {e}")
    fresh = [torch_inputs(c, c["seed"] + 3 + i) for i in range(2)] + [
        torch_inputs(c, c["seed"] + 9, pad=False), torch_inputs(c, c["seed"] + 10, empty_row=True)]
    if c["capture"] == "export":
        dyn = None
        if c["near"] == "dynamic_seq":
            sd = torch.export.Dim("seq", min=2, max=64)
            kseq = 3 if c["ktrans"] == "pretransposed" else 2
            dyn = [{2: sd}, {kseq: sd}, {2: sd}]
            dyn += [{1: sd} if a.dim() == 2 else {2: sd, 3: sd} for a in inputs[3:]]
            longer = dict(c, S=c["S"] + 3, Sk=c["S"] + 3)
            fresh += [torch_inputs(longer, c["seed"] + 11 + i) for i in range(2)]
        with torch.no_grad():
            ep = torch.export.export(m, tuple(inputs), dynamic_shapes=dyn, strict=False)
        gm, source = ep.module(), "aten"
    else:
        gm, source = torch.fx.symbolic_trace(m), "fx"
        _Prop.run(gm, inputs)
    report = attnopt.inspect(gm, inputs)
    new_gm, res = optimize_graph_module(gm, inputs, source=source)
    n_sites, rew = len(report.sites), res.sites_rewritten
    wrong = _site_expectation(c, report, res)
    if wrong is not None:
        return wrong
    reverted = sum(1 for s in res.sites if s.status == "reverted")
    # fp16: judged against the program's fp32 twin, as for ONNX (see run_onnx).
    twin = torch_module(dict(c, dtype="float32")) if c["dtype"] == "float16" else None
    worst = 0.0
    with torch.no_grad():
        for inp in fresh:
            ref = m(*inp)
            got = new_gm(*inp)
            if twin is None:
                worst = max(worst, _max_rel(ref, got))
                continue
            truth = twin(*[x.float() if x.is_floating_point() else x for x in inp])
            worst = max(worst, _max_rel(truth, got) - _max_rel(truth, ref))
    if worst > _tol(c):
        return Outcome(False, n_sites, rew, f"miscompile: optimized output differs by {worst:.3g} "
                       f"(relative) on fresh inputs, tolerance {_tol(c):g}")
    return Outcome(True, n_sites, rew, reverted=reverted)


# ---- ONNX programs --------------------------------------------------------------------------

def onnx_model(c: dict[str, Any]):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_choices(c)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    near = c["near"]
    fp16 = c["dtype"] == "float16"
    ET = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    npdt = np.float16 if fp16 else np.float32
    rng = np.random.default_rng(c["seed"] + 1)
    nodes, inits, inputs, outputs = [], [], [], []
    cnt = [0]

    def name(p: str) -> str:
        cnt[0] += 1
        return f"{p}_{cnt[0]}"

    def const(val, dtype=None) -> str:
        n = name("c")
        arr = np.asarray(val, dtype=dtype if dtype is not None else npdt)
        inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(op, ins, **attrs) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    dyn = near == "dynamic_seq"
    sdim = "S" if dyn else S
    skdim = "S" if dyn and not c["cross"] else ("Sk" if dyn else Sk)
    sc = _scale_value(c)
    if c["layout"] == "proj":
        inputs.append(helper.make_tensor_value_info("x", ET, [B, sdim, H * D]))

        def proj(nh, d):
            w = const((rng.standard_normal((H * D, nh * d)) * 2 / math.sqrt(H * D)).astype(npdt))
            y = node("MatMul", ["x", w])
            y = node("Reshape", [y, const([0, 0, nh, d], np.int64)])
            return y
        q = node("Transpose", [proj(H, D)], perm=[0, 2, 1, 3])
        kb = proj(KVH, D)  # [B,S,KVH,D]
        v = node("Transpose", [proj(KVH, Dv)], perm=[0, 2, 1, 3])
    else:
        inputs.append(helper.make_tensor_value_info("q", ET, [B, H, sdim, D]))
        kshape = [B, KVH, D, skdim] if c["ktrans"] == "pretransposed" else (
            [B, skdim, KVH, D] if c["ktrans"] == "bshd_permute" else [B, KVH, skdim, D])
        inputs.append(helper.make_tensor_value_info("k", ET, kshape))
        inputs.append(helper.make_tensor_value_info("v", ET, [B, KVH, skdim, Dv]))
        q, kb, v = "q", "k", "v"
    # kT: [B, KVH, D, Sk]
    if c["ktrans"] == "pretransposed":
        kt = kb
    elif c["ktrans"] == "bshd_permute" or c["layout"] == "proj":
        kt = node("Transpose", [kb], perm=[0, 2, 3, 1])
    else:
        kt = node("Transpose", [kb], perm=[0, 1, 3, 2])
    if c["gqa"] != "none":
        n = H // KVH
        if c["gqa"] == "expand":
            def rep(t, a, b_):  # [B,KVH,a,b] -> [B,KVH,n,a,b] -> [B,H,a,b]
                u = node("Unsqueeze", [t, const([2], np.int64)])
                e = node("Expand", [u, const([1, 1, n, 1, 1], np.int64)])
                return node("Reshape", [e, const([B, H, a, b_] if not dyn else [0, H, -1, b_], np.int64)])
            kt = node("Reshape", [node("Expand", [node("Unsqueeze", [kt, const([2], np.int64)]),
                                                  const([1, 1, n, 1, 1], np.int64)]),
                                  const([B, H, D, -1], np.int64)])
            v = rep(v, Sk, Dv) if not dyn else rep(v, -1, Dv)
        else:  # tile then reshape (repeat_interleave order)
            kt = node("Reshape", [node("Tile", [node("Unsqueeze", [kt, const([2], np.int64)]),
                                                const([1, 1, n, 1, 1], np.int64)]),
                                  const([B, H, D, -1], np.int64)])
            v = node("Reshape", [node("Tile", [node("Unsqueeze", [v, const([2], np.int64)]),
                                               const([1, 1, n, 1, 1], np.int64)]),
                                 const([B, H, -1, Dv], np.int64)])
    s_ = c["scale"]
    if near == "nonconst_scale":
        inputs.append(helper.make_tensor_value_info("t", ET, []))
    if s_ == "q_mul":
        q = node("Mul", [q, const(sc)])
    elif s_ == "split_sqrt":
        q = node("Mul", [q, const(math.sqrt(sc))])
        kt = node("Mul", [kt, const(math.sqrt(sc))])
    s = node("MatMul", [q, kt])
    if s_ == "scores_mul":
        s = node("Mul", [s, "t" if near == "nonconst_scale" else const(sc)])
    elif s_ == "scores_div":
        s = node("Div", [s, "t" if near == "nonconst_scale" else const(1 / sc)])
    elif near == "nonconst_scale":
        s = node("Mul", [s, "t"])
    if c["softcap"]:
        s = node("Mul", [node("Tanh", [node("Div", [s, const(30.0)])]), const(30.0)])
    m = c["mask"]
    fillv = {"-inf": -np.inf, "finfo_min": float(np.finfo(npdt).min),
             "large_neg": -1e4 if fp16 else -1e9}[c["fill"]]
    tril = np.tril(np.ones((S, Sk), dtype=bool))
    if m == "pad_add":
        inputs.append(helper.make_tensor_value_info("am", TensorProto.INT64, [B, skdim]))
        f = node("Cast", ["am"], to=ET)
        f = node("Sub", [const(1.0), f])
        f = node("Mul", [f, const(float(np.finfo(npdt).min))])
        f = node("Unsqueeze", [f, const([1, 2], np.int64)])
        s = node("Add", [s, f])
    elif m == "pad_bool":
        # transformers 5: a bool key mask broadcast over queries by And with a trivially true
        # query test, turned additive by Where (the form attnopt folds into q/k for ORT's MHA)
        inputs.append(helper.make_tensor_value_info("am", TensorProto.INT64, [B, skdim]))
        kb = node("Unsqueeze", [node("Cast", ["am"], to=TensorProto.BOOL), const([1, 2], np.int64)])
        if dyn:  # the query positions at run time (self-attention: the mask's length)
            n = node("Gather", [node("Shape", ["am"]), const([1], np.int64)], axis=0)
            qi = node("Range", [const(0, np.int64), node("Squeeze", [n, const([0], np.int64)]),
                                const(1, np.int64)])
            qi = node("Reshape", [qi, const([1, 1, -1, 1], np.int64)])
        else:
            qi = const(np.arange(S).reshape(1, 1, S, 1), np.int64)
        qok = node("GreaterOrEqual", [qi, const(0, np.int64)])
        both = node("And", [qok, kb])
        s = node("Add", [s, node("Where", [both, const(0.0), const(fillv)])])
    elif m == "causal_where":
        s = node("Where", [const(tril, bool), s, const(fillv)])
    elif m == "causal_add":
        s = node("Add", [s, const(np.where(tril, 0.0, fillv).astype(npdt))])
    elif m == "sliding":
        i, j = np.arange(S)[:, None], np.arange(Sk)[None, :]
        s = node("Where", [const((j <= i) & (i - j < 3), bool), s, const(fillv)])
    elif m == "bias":
        s = node("Add", [s, const((rng.standard_normal((H, S, Sk)) * 2).astype(npdt))])
    elif m == "dense_input":
        inputs.append(helper.make_tensor_value_info("dm", TensorProto.BOOL, [B, 1, sdim, skdim]))
        s = node("Where", ["dm", s, const(fillv)])
    if c["cast"] == "float_cast":
        s = node("Cast", [s], to=TensorProto.FLOAT)
    p = node("Softmax", [s], axis=2 if near == "softmax_axis" else -1)
    if c["cast"] == "float_cast":
        p = node("Cast", [p], to=ET)
    if c["nan_guard"]:
        p = node("Where", [node("IsNaN", [p]), const(0.0), p])
    if near == "extra_op_probs":
        p = node("Mul", [p, p])
    pp = node("Transpose", [p], perm=[0, 1, 3, 2]) if near == "contract_query" else p
    o = node("MatMul", [pp, v])
    if c["layout"] == "proj":
        o = node("Transpose", [o], perm=[0, 2, 1, 3])
        o = node("Reshape", [o, const([0, 0, H * Dv], np.int64)])
    nodes.append(helper.make_node("Identity", [o], ["out"], name="out_identity"))
    oshape = [B, sdim, H * Dv] if c["layout"] == "proj" else [B, H, skdim if near == "contract_query" else sdim, Dv]
    outputs.append(helper.make_tensor_value_info("out", ET, oshape))
    if near == "probs_returned":
        nodes.append(helper.make_node("Identity", [p], ["probs"], name="probs_identity"))
        outputs.append(helper.make_tensor_value_info("probs", ET, [B, H, sdim, skdim]))
    g = helper.make_graph(nodes, f"fuzz_{c['seed']}", inputs, outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", c["opset"])])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_feeds(c: dict[str, Any], model, seed: int, pad: bool = True, seq: int | None = None,
               empty_row: bool = False):
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = {"S": seq or c["S"], "Sk": (seq or c["S"]) + (c["Sk"] - c["S"])}
    feeds = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in tt.shape.dim]
        if vi.name == "am":
            a = np.ones(shape, dtype=np.int64)
            if pad:
                for b in range(shape[0]):
                    a[b, rng.integers(1, shape[1] + 1):] = 0
            if empty_row and c["mask"] == "pad_bool":
                a[0] = 0  # every key of batch row 0 masked
            feeds[vi.name] = a
        elif vi.name == "dm":
            d = rng.random(shape) < 0.6
            d[..., 0] = True
            if empty_row:
                d[0, 0, 0, :] = False
            feeds[vi.name] = d
        elif vi.name == "t":
            feeds[vi.name] = np.asarray(_scale_value(c), dtype=np.float16 if c["dtype"] == "float16" else np.float32)
        else:
            dt = np.float16 if c["dtype"] == "float16" else np.float32
            feeds[vi.name] = (rng.standard_normal(shape) * 1.5).astype(dt)
    return feeds


def _ort_run(model, feeds):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_onnx(c: dict[str, Any]) -> Outcome:
    import torch

    import attnopt

    model = onnx_model(c)
    report = attnopt.inspect(model)
    res = attnopt.optimize(model)
    n_sites, rew = len(report.sites), res.sites_rewritten
    wrong = _site_expectation(c, report, res)
    if wrong is not None:
        return wrong
    reverted = sum(1 for s in res.sites if s.status == "reverted")
    seqs = [None] + ([c["S"] + 3] if c["near"] == "dynamic_seq" and c["mask"] not in (
        "causal_where", "causal_add", "sliding", "bias") else [])
    # fp16: the original's own rounding is of the same size as the tolerance, so both programs
    # are measured against the fp32 twin of the program (same weights), and the optimized one
    # may not be worse than the original by more than the tolerance.
    twin = onnx_model(dict(c, dtype="float32")) if c["dtype"] == "float16" else None
    worst = 0.0
    for i, seq in enumerate(seqs):
        for j, pad in enumerate((True, True, False, True)):
            feeds = onnx_feeds(c, model, c["seed"] + 3 + 7 * i + j, pad=pad, seq=seq,
                               empty_row=j == 3)
            ref = [torch.from_numpy(x) for x in _ort_run(model, feeds)]
            got = [torch.from_numpy(x) for x in _ort_run(res.model, feeds)]
            if twin is None:
                worst = max(worst, _max_rel(ref, got))
                continue
            feeds32 = {k: v.astype(np.float32) if v.dtype == np.float16 else v
                       for k, v in feeds.items()}
            truth = [torch.from_numpy(x) for x in _ort_run(twin, feeds32)]
            worst = max(worst, _max_rel(truth, got) - _max_rel(truth, ref))
    if worst > _tol(c):
        return Outcome(False, n_sites, rew, f"miscompile: optimized output differs by {worst:.3g} "
                       f"(relative) in ONNX Runtime on fresh inputs, tolerance {_tol(c):g}")
    return Outcome(True, n_sites, rew, reverted=reverted)


def run_case(c: dict[str, Any]) -> Outcome:
    """Run one case; an exception inside attnopt is a failure, not a crash of the fuzzer.
    BadCase (raised, nothing run) for choices the grammar does not allow."""
    check_choices(c)
    try:
        return run_torch(c) if c["kind"] == "torch" else run_onnx(c)
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        return Outcome(False, message=f"crash: {type(e).__name__}: {str(e)[:300]} | {' / '.join(tb[-4:])[:500]}")


# ---- driver ---------------------------------------------------------------------------------

@dataclass
class Summary:
    cases: int = 0
    failures: int = 0
    forms: set = field(default_factory=set)
    sites: int = 0
    rewritten: int = 0
    reverted: int = 0
    by_kind: dict = field(default_factory=dict)
    elapsed: float = 0.0
    failure_files: list = field(default_factory=list)

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        return (f"fuzz: {self.cases} cases ({kinds}), {len(self.forms)} forms exercised, "
                f"{self.sites} sites, {self.rewritten} rewritten, {self.reverted} reverted by "
                f"validation, {self.failures} failures, "
                f"{self.elapsed:.0f} s")


def _one(args: tuple[int, int, str]) -> tuple[int, dict[str, Any], Outcome]:
    seed, i, k = args
    c = sample(random.Random(f"{seed}-{i}"), k)
    return i, c, run_case(c)


def _init_worker() -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)


def fuzz(cases: int, seed: int, kind: str = "both", time_limit: float | None = None,
         out_dir: str | Path = "fuzz-failures", progress: bool = True, jobs: int = 1) -> Summary:
    """Run `cases` cases (case i draws its choices from seed and i alone, so any case replays
    on its own and the run does not depend on `jobs`)."""
    import multiprocessing as mp

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    _init_worker()
    out = Path(out_dir)
    summ = Summary()
    t0 = time.time()
    kinds = ["torch", "onnx"] if kind == "both" else [kind]
    work = ((seed, i, kinds[i % len(kinds)]) for i in range(cases))
    pool = mp.get_context("fork").Pool(jobs, initializer=_init_worker) if jobs > 1 else None
    results = pool.imap_unordered(_one, work, chunksize=4) if pool else map(_one, work)
    prog = Progress(TextColumn("fuzz"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not progress, transient=False)
    try:
        with prog:
            task = prog.add_task("fuzz", total=cases, info="")
            for i, c, o in results:
                k = c["kind"]
                summ.cases += 1
                summ.by_kind[k] = summ.by_kind.get(k, 0) + 1
                summ.forms |= forms(c)
                summ.sites += o.sites
                summ.rewritten += o.rewritten
                summ.reverted += o.reverted
                if not o.ok:
                    summ.failures += 1
                    out.mkdir(parents=True, exist_ok=True)
                    f = out / f"{k}-{seed}-{i}.json"
                    f.write_text(json.dumps({"seed": seed, "index": i, "message": o.message,
                                             "choices": c}, indent=1))
                    summ.failure_files.append(str(f))
                    prog.console.print(f"[red]FAIL[/red] {f}: {o.message[:200]}", highlight=False)
                prog.update(task, advance=1,
                            info=f"{len(summ.forms)} forms, {summ.failures} failures")
                if time_limit is not None and time.time() - t0 > time_limit:
                    break
    finally:
        if pool:
            pool.terminate()
    summ.elapsed = time.time() - t0
    return summ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnopt.testing.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=["torch", "onnx", "both"], default="both")
    ap.add_argument("--time-limit", type=float, default=None, help="stop after SECONDS")
    ap.add_argument("--out", default="fuzz-failures", help="directory for failing case files")
    ap.add_argument("--replay", default=None, help="re-run one case file and print its outcome")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    a = ap.parse_args(argv)
    if a.replay:
        try:
            c = load_case(a.replay)
        except BadCase as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        o = run_case(c)
        print(("ok" if o.ok else "FAIL: " + o.message), f"(sites {o.sites}, rewritten {o.rewritten})")
        if c["kind"] == "torch":
            print("class Case(nn.Module):\n" + torch_source(c))
        return 0 if o.ok else 1
    s = fuzz(a.cases, a.seed, a.kind, a.time_limit, a.out, progress=not a.no_progress,
             jobs=a.jobs)
    print(s.line())
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
