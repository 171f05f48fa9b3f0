"""The kernel table (attnopt/codegen/select.py): its order, its one signature, once-per-reason
logging of Triton refusals, and that the three entry points (attnopt::attention,
attnopt::gna_attention, attnopt.attention) run the row the table chooses for them.

Layouts: q [B, H, S, D], k/v [B, Hkv, S, D]; GNA tokens are the row-major flattened grid after
`leading` global tokens. Shapes are small (the forced-Triton cases run under the interpreter).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch

import attnopt
from attnopt.codegen import select
from attnopt.codegen.gna_op import gna_attention_op
from attnopt.codegen.ops import attention_op
from attnopt.codegen.params import AttentionParams, TokenLayout
from attnopt.ir import GNALayout

ORDER = [
    "triton_block_sparse_gna", "triton_decode", "triton_sliding_window", "triton_causal", "triton_sigmoid", "triton_dense",
    "cpu_small_decode", "cpu_padded", "cpu_native", "cpu_tiles", "cpu_decode", "sdpa", "reference",
]
LAYOUT = GNALayout((6, 7), (3, 5), (1, 2), (1, 1), (False, False))


def _qkv(S, D=16, H=2, Hkv=2, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, h, S, D, generator=g) for h in (H, Hkv, Hkv)]
    return [x.requires_grad_() for x in xs] if grad else xs


@pytest.fixture
def ran(monkeypatch):
    """Names of the rows that ran, in call order (every row's run is wrapped)."""
    names: list[str] = []

    def record(row):
        def run(*a, **kw):
            names.append(row.name)
            return row.run(*a, **kw)
        return dataclasses.replace(row, run=run)

    monkeypatch.setattr(select, "TABLE", tuple(record(c) for c in select.TABLE))
    return names


@pytest.fixture
def forced(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))


def test_table_order():
    assert [c.name for c in select.TABLE] == ORDER
    assert [c.group for c in select.TABLE] == ["triton"] * 6 + ["cpu"] * 5 + ["exact"] * 2
    assert [c.family for c in select.TABLE[:6]] == [
        "block_sparse_gna", "decode", "sliding_window", "causal", "sigmoid", "dense"]


CASES = {
    "dense": (AttentionParams(scale=0.25), None, 42),
    "causal": (AttentionParams(scale=0.25, causal=True), None, 42),
    "window": (AttentionParams(scale=0.25, window=(4, 2)), None, 42),
    "sigmoid_softcap": (AttentionParams(scale=0.25, normalizer="sigmoid", softcap=3.0), None, 42),
    "gna": (AttentionParams(scale=0.25), TokenLayout(LAYOUT), 42),
    "gna_leading": (AttentionParams(scale=0.25), TokenLayout(LAYOUT, 2), 44),
    "leading_without_grid": (AttentionParams(scale=0.25), TokenLayout(None, 2), 44),
}
REQUESTS = [
    select.Request(), select.Request(backend="triton"), select.Request(backend="cpu"),
    select.Request(backend="reference"), select.Request(needs_grad=True),
    select.Request(caller="attention"), select.Request(caller="attention", force_triton=True),
    select.Request(caller="gna_attention", force_triton=True),
]


@pytest.mark.parametrize("case", list(CASES))
def test_every_can_run_answers_bool_and_reason(case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params, layout, S = CASES[case]
    q, k, v = _qkv(S)
    for request in REQUESTS:
        for c in select.TABLE:
            ok, why = c.can_run(q, k, v, None, params, layout, request)
            assert type(ok) is bool and isinstance(why, str), (c.name, request)
            assert ok or why, f"{c.name} refused {case} for {request} without a reason"
        choice = select.choose(q, k, v, None, params, layout, request)
        assert choice.name in ORDER and set(choice.refusals) == set(ORDER[:ORDER.index(choice.name)])
    # the last row takes anything
    assert select.candidate("reference").can_run(q, k, v, None, params, layout) == (True, "")


def test_refusal_logged_once_per_reason(forced, monkeypatch, caplog, ran):
    monkeypatch.setattr(select, "_LOGGED", set())
    big = torch.randn(1, 1, 8, 512)  # head dim 512: no Triton family takes it
    with caplog.at_level(logging.WARNING, logger="attnopt.codegen.triton"):
        for _ in range(3):
            attention_op(big, big, big, scale=0.1)
        attention_op(big, big, big, scale=0.1, causal=True)  # another reason: "causal: ..." changes
    declined = [r.getMessage() for r in caplog.records if "Triton kernel declined" in r.getMessage()]
    assert len(declined) == 2, declined
    assert "dense: head dim 512 > 256" in declined[0] and "block_sparse_gna: no GNA layout" in declined[0]
    assert ran == ["sdpa"] * 4
    # the GNA op names itself in its reasons
    caplog.clear()
    S = 1 + 42
    q = torch.randn(1, 1, S, 512)
    with caplog.at_level(logging.WARNING, logger="attnopt.codegen.triton"):
        gna_attention_op(q, q, q, None, scale=0.1, layout=LAYOUT, leading=1)
        gna_attention_op(q, q, q, None, scale=0.1, layout=LAYOUT, leading=1)
    declined = [r.getMessage() for r in caplog.records if "Triton kernel declined" in r.getMessage()]
    assert len(declined) == 1 and "gna_attention: block_sparse_gna: head dim 512" in declined[0], declined


def _op_case(name):
    """(run the entry point, (q, k, v, mask, params, layout, request) the table is asked with)."""
    if name == "op_dense":
        q, k, v = _qkv(40)
        return (lambda: attention_op(q, k, v, scale=0.25),
                (q, k, v, None, AttentionParams(scale=0.25), None, select.Request.for_op("attention")))
    if name == "op_causal":
        q, k, v = _qkv(40)
        return (lambda: attention_op(q, k, v, scale=0.25, causal=True),
                (q, k, v, None, AttentionParams(scale=0.25, causal=True), None, select.Request.for_op("attention")))
    if name in ("op_window", "op_window_wide"):
        S, w = (300, (31, 0)) if name == "op_window" else (64, (100, 100))
        q, k, v = _qkv(S)
        p = AttentionParams(scale=0.25, causal=True, window=w)
        return (lambda: attention_op(q, k, v, scale=0.25, causal=True, window=w),
                (q, k, v, None, p, None, select.Request.for_op("attention")))
    if name == "functional_window_wide":
        q, k, v = _qkv(64)
        p = AttentionParams(scale=0.25, window=(100, 100))
        return (lambda: attnopt.attention(q, k, v, window=(100, 100), scale=0.25),
                (q, k, v, None, p, None, select.Request()))
    if name == "gna_op_2d":
        q, k, v = _qkv(43)
        return (lambda: gna_attention_op(q, k, v, None, scale=0.25, layout=LAYOUT, leading=1),
                (q, k, v, None, AttentionParams(scale=0.25), TokenLayout(LAYOUT, 1),
                 select.Request.for_op("gna_attention")))
    if name == "gna_op_sigmoid":
        q, k, v = _qkv(43)
        return (lambda: gna_attention_op(q, k, v, None, scale=0.25, layout=LAYOUT, leading=1,
                                         normalizer="sigmoid"),
                (q, k, v, None, AttentionParams(scale=0.25, normalizer="sigmoid"), TokenLayout(LAYOUT, 1),
                 select.Request.for_op("gna_attention", backend="reference")))
    if name == "functional_gna_2d":
        q, k, v = _qkv(42)
        return (lambda: attnopt.attention(q, k, v, grid=(6, 7), window=(3, 5), stride=(1, 2), scale=0.25),
                (q, k, v, None, AttentionParams(scale=0.25), TokenLayout(LAYOUT), select.Request()))
    if name == "functional_gna_grad":
        q, k, v = _qkv(42, grad=True)
        return (lambda: attnopt.attention(q, k, v, grid=(6, 7), window=(3, 5), stride=(1, 2), scale=0.25),
                (q, k, v, None, AttentionParams(scale=0.25), TokenLayout(LAYOUT), select.Request(needs_grad=True)))
    raise KeyError(name)


@pytest.mark.parametrize("name,expect", [
    ("op_dense", {"sdpa"}),
    ("op_causal", {"sdpa"}),
    ("op_window", {"cpu_native", "cpu_tiles"}),
    ("op_window_wide", {"sdpa"}),                       # the op: nothing to skip, dense is faster
    ("functional_window_wide", {"cpu_native", "cpu_tiles"}),  # attnopt.attention runs it anyway
    ("gna_op_2d", {"cpu_native", "cpu_tiles"}),
    ("gna_op_sigmoid", {"reference"}),
    ("functional_gna_2d", {"cpu_native", "cpu_tiles"}),
    ("functional_gna_grad", {"cpu_native", "cpu_tiles"}),  # compiled forward + backward (native_backward.py)
])
def test_entry_points_run_the_tables_choice(name, expect, ran):
    call, asked = _op_case(name)
    want = select.choose(*asked).name
    assert want in expect
    out = call()
    assert ran == [want]
    if name == "functional_gna_grad":
        out.sum().backward()  # a real graph behind the result
        assert asked[0].grad is not None


def test_forced_triton_under_the_interpreter(forced, ran):
    q, k, v = _qkv(33)
    attention_op(q, k, v, scale=0.25, causal=True)
    attention_op(q, k, v, scale=0.25, causal=True, window=(5, 0))
    q, k, v = _qkv(43)
    gna_attention_op(q, k, v, None, scale=0.25, layout=LAYOUT, leading=1)
    assert ran == ["triton_causal", "triton_sliding_window", "triton_block_sparse_gna"]
    assert select.choose(q, k, v, None, AttentionParams(scale=0.25), TokenLayout(LAYOUT, 1),
                         select.Request.for_op("gna_attention")).name == "triton_block_sparse_gna"
    # attnopt.attention ignores ATTNOPT_FORCE_TRITON; backend="triton" asks for the interpreter
    q, k, v = _qkv(42)
    attnopt.attention(q, k, v, grid=(6, 7), window=(3, 5), stride=(1, 2), scale=0.25)
    attnopt.attention(q, k, v, grid=(6, 7), window=(3, 5), stride=(1, 2), scale=0.25, backend="triton")
    assert ran[3:] in (["cpu_native", "triton_block_sparse_gna"], ["cpu_tiles", "triton_block_sparse_gna"])


def test_gradients_keep_triton_out(forced, ran):
    q, k, v = _qkv(42, grad=True)
    with pytest.raises(RuntimeError, match="forward only"):
        attnopt.attention(q, k, v, grid=(6, 7), window=(3, 5), backend="triton")
    request = select.Request(backend="triton", needs_grad=True)
    ok, why = select.TABLE[0].can_run(q, k, v, None, AttentionParams(scale=0.25), TokenLayout(LAYOUT), request)
    assert not ok and "forward only" in why
    assert ran == []
    with torch.no_grad():
        attnopt.attention(q, k, v, grid=(6, 7), window=(3, 5), stride=(1, 2), backend="triton")
    assert ran == ["triton_block_sparse_gna"]


def test_no_import_cycle_in_the_kernel_layer():
    grimp = pytest.importorskip("grimp")
    nx = pytest.importorskip("networkx")
    g = grimp.build_graph("attnopt")
    G = nx.DiGraph([(m, t) for m in g.modules if m.startswith("attnopt.codegen")
                    for t in g.find_modules_directly_imported_by(m) if t.startswith("attnopt.codegen")])
    assert list(nx.simple_cycles(G)) == []


def test_triton_is_imported_only_when_a_triton_row_applies():
    script = ("import sys, torch, attnopt\n"
              "q = torch.randn(1, 2, 64, 16)\n"
              "attnopt.attention(q, q, q, causal=True)\n"
              "attnopt.codegen.ops.attention_op(q, q, q, scale=0.25, window=(8, 8))\n"
              "print('attnopt.codegen.triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "ATTNOPT_FORCE_TRITON"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]
