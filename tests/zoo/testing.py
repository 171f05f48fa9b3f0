"""Helpers shared by the zoo tests: the shared export dir, spec comparison, reference math."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

SPEC_FIELDS = ("normalizer", "num_heads", "num_kv_heads", "q_len", "kv_len", "head_dim", "scale",
               "mask", "score_mods", "token_grid")


def shared_dir(tmp_path_factory, name: str = "zoo_exports") -> Path:
    """A session directory shared by all xdist workers (exports are file-locked there)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _dim_ok(got: Any, want: int, static: bool) -> bool:
    if isinstance(got, str):
        return not static
    return int(got) == want


def spec_mismatches(spec, want: dict[str, Any], static: bool = True) -> list[str]:
    """Every field of an AttentionSpec that differs from an expected-site dict."""
    bad = []
    for f in ("normalizer", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(spec, f) != want[f]:
            bad.append(f"{f}: got {getattr(spec, f)!r}, want {want[f]!r}")
    for f in ("q_len", "kv_len"):
        if not _dim_ok(getattr(spec, f), want[f], static):
            bad.append(f"{f}: got {getattr(spec, f)!r}, want {want[f]!r}")
    # A half-precision model stores its scale constant in half precision (ONNX exports do; torch
    # multiplies by the python float): compare at that precision.
    rel = 1e-3 if spec.dtype in ("float16", "bfloat16") else 1e-5
    if spec.scale is None or not math.isclose(spec.scale, want["scale"], rel_tol=rel):
        bad.append(f"scale: got {spec.scale!r}, want {want['scale']!r}")
    for k, v in want["mask"].items():
        got = getattr(spec.mask, k)
        if got != v:
            bad.append(f"mask.{k}: got {got!r}, want {v!r}")
    if tuple(spec.score_mods) != tuple(want["score_mods"]):
        bad.append(f"score_mods: got {tuple(spec.score_mods)!r}, want {tuple(want['score_mods'])!r}")
    tg, wg = spec.token_grid, want["token_grid"]
    got_g = None if tg is None else {"shape": tuple(tg.shape), "leading": tg.leading}
    if got_g != wg:
        bad.append(f"token_grid: got {got_g!r}, want {wg!r}")
    return bad


def comparable(spec) -> dict[str, Any]:
    """The spec as JSON minus fields that may legitimately differ between flavours."""
    d = spec.to_json()
    d.pop("dtype", None)
    d.pop("layout", None)
    digits = 3 if spec.dtype in ("float16", "bfloat16") else 5
    d["scale"] = None if d["scale"] is None else round(d["scale"], digits)
    return d


def inspect_flavour(obj: Any, inputs: Any, flavour: str):
    """attnopt.inspect on one flavour; for "compile" the sites and rejections of every
    captured graph, concatenated in call order. Returns (sites, rejected)."""
    import attnopt

    if flavour == "compile":
        sites, rejected = [], []
        for gm, ex in obj:
            r = attnopt.inspect(gm, ex)
            sites += r.sites
            rejected += r.rejected
        return sites, rejected
    r = attnopt.inspect(obj, inputs)
    return r.sites, r.rejected


def check_sites(sites, expected: list[dict[str, Any]], static: bool = True) -> None:
    names = [s.name for s in sites]
    assert len(sites) == len(expected), f"found {len(sites)} sites {names}, want {len(expected)}"
    errors = []
    for i, (s, w) in enumerate(zip(sites, expected)):
        bad = spec_mismatches(s.spec, w, static)
        if bad:
            errors.append(f"site {i} ({s.name}): " + "; ".join(bad))
    assert not errors, "\n".join(errors)


def check_rejected(sites, rejected, keywords: str) -> None:
    assert not sites, f"near miss detected as attention: {[s.name for s in sites]}"
    kws = [k.strip().lower() for k in keywords.split("|")]
    reasons = [r.reason for r in rejected]
    assert any(any(k in r.lower() for k in kws) for r in reasons), (
        f"no rejection mentions any of {kws}; rejections: {reasons}")


# ---- reference math from an expected-site dict ------------------------------------------

def allowed_from_spec(want: dict[str, Any], q_len: int, kv_len: int) -> torch.Tensor:
    m = want["mask"]
    i = torch.arange(q_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    d = j - i - (kv_len - q_len)
    kind = m["kind"]
    if kind in ("none", "padding"):
        return torch.ones(q_len, kv_len, dtype=torch.bool)
    if kind == "causal":
        return d <= 0
    if kind == "sliding_window":
        return (d <= m["right"]) & (d >= -m["left"])
    if kind == "block":
        return (i // m["block"]) == (j // m["block"])
    raise ValueError(kind)


def reference_attention(want: dict[str, Any], q, k, v, key_padding: torch.Tensor | None = None):
    """Attention as the expected spec states it (q,k,v: [B,H,S,D]; key_padding: [B,S] 1=keep)."""
    q, k, v = q.float(), k.float(), v.float()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-2, -1) * want["scale"]
    ok = allowed_from_spec(want, q.shape[2], k.shape[2])[None, None]
    if want["mask"].get("padding"):
        ok = ok & key_padding[:, None, None, :].bool()
    if want["normalizer"] == "softmax":
        p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
    else:
        raise ValueError(want["normalizer"])
    return p @ v


def run_cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `attnopt ARGS`, in-process (a subprocess per call costs
    seconds of torch import); non-exit exceptions propagate so a test sees the real failure."""
    from typer.testing import CliRunner

    from attnopt.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def spy_optimize(monkeypatch) -> list:
    """Record the OptimizeResult of every graph the pipeline optimizes (the compile backend's
    graphs included), by wrapping optimize_graph_module; returns the list it fills."""
    import attnopt.pipeline.optimize_torch as opt_torch

    seen = []
    real = opt_torch.optimize_graph_module

    def spy(gm, inputs, **kw):
        new, res = real(gm, inputs, **kw)
        seen.append(res)
        return new, res

    monkeypatch.setattr(opt_torch, "optimize_graph_module", spy)
    return seen


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against the reference `b` (in float32)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_first(fn, kwargs: dict) -> torch.Tensor:
    """The first tensor `fn(**kwargs)` returns, under no_grad with a fixed seed (models that draw
    random numbers in their forward draw the same ones each run)."""
    from zoo.hf import first_tensor

    torch.manual_seed(0)
    with torch.no_grad():
        return first_tensor(fn(**kwargs))
