"""Tile tuning of the Triton backwards (codegen/triton/backward.py `tuned_tiles`, `candidates`; the
GNA backward's in gna_backward.py), as the forward's configs are tuned: every candidate timed once per
key, the fastest run and remembered in memory and on disk, lengths bucketed so a growing sequence does
not retune, and every candidate giving the same gradients.

On a GPU the candidates are several (aot.py compiles each for sm_90); under the interpreter there is one,
so these tests offer two interpreter-sized candidates and a fake timer (triton's do_bench needs CUDA).
Layouts: q [B, H, S, D], k / v [B, Hkv, S, D], as the op.
"""
from __future__ import annotations

import json

import pytest
import torch

from attnopt.codegen.params import AttentionParams, TokenLayout
from attnopt.ir import GNALayout

backward = pytest.importorskip("attnopt.codegen.triton.backward", reason="needs triton (installed on Linux only)")
gna_backward = pytest.importorskip("attnopt.codegen.triton.gna_backward", reason="needs triton (installed on Linux only)")


@pytest.fixture(autouse=True)
def _interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNOPT_AUTOTUNE", "1")
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backward, "_TUNED", {})


def _fake_timer(monkeypatch, cands):
    """Time candidate i as 1 / (i + 1) seconds (the last is fastest) after running it once."""
    timed = []

    def bench(fn):
        fn()
        timed.append(len(timed))
        return 1.0 / len(timed)

    monkeypatch.setattr(backward.launcher, "_bench", bench)
    return timed


def _grads(q, k, v, grad_out, mask, params):
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    s = xs[0] @ xs[1].transpose(-1, -2) * params.scale
    if params.causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    out = s.softmax(-1) @ xs[2]
    return torch.autograd.grad(out, xs, grad_out.double())


def _close(got, want):
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()


def _dense_case(S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, S, 16, generator=g) * 2
    k, v, do = (torch.randn(1, 2, S, 16, generator=g) for _ in range(3))
    return q, k, v, do


def test_dense_backward_tunes_once_per_bucket_and_remembers_on_disk(monkeypatch, tmp_path):
    cands = [backward.Tiles(32, 32, 4, 1, 32), backward.Tiles(16, 16, 4, 1, 16)]
    monkeypatch.setattr(backward, "candidates", lambda q: cands)
    timed = _fake_timer(monkeypatch, cands)
    chosen = []
    real_calls = backward.backward_calls
    monkeypatch.setattr(backward, "backward_calls",
                        lambda *a, **kw: chosen.append(a[-1]) or real_calls(*a, **kw))
    params = AttentionParams(scale=0.25, causal=True)
    needs = [True, True, True, False]
    for S in (37, 45, 60):  # one bucket (64): tuned at the first length only
        q, k, v, do = _dense_case(S)
        got = backward.attention_backward(do, q, k, v, None, params, needs)[:3]
        _close(got, _grads(q, k, v, do, None, params))
        assert chosen[-1] == cands[1]  # the fastest ran
    assert len(timed) == 2
    files = list((tmp_path / "cache").rglob("tune-*.json"))
    assert len(files) == 1
    entry = json.loads(files[0].read_text())
    assert entry["key"]["kernel"] == "attention_backward" and entry["key"]["q_len"] == 64
    assert entry["config"]["block_m"] == 16 and len(entry["timings_ms"]) == 2
    # another process (an empty memory): the disk entry, no timing
    monkeypatch.setattr(backward, "_TUNED", {})
    q, k, v, do = _dense_case(50)
    backward.attention_backward(do, q, k, v, None, params, needs)
    assert len(timed) == 2 and chosen[-1] == cands[1]
    # a length in another bucket tunes again
    q, k, v, do = _dense_case(70)
    got = backward.attention_backward(do, q, k, v, None, params, needs)[:3]
    _close(got, _grads(q, k, v, do, None, params))
    assert len(timed) == 4


def test_every_dense_candidate_gives_the_same_gradients(monkeypatch):
    q, k, v, do = _dense_case(41, seed=3)
    mask = torch.rand(1, 1, 41, 41, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    params = AttentionParams(scale=0.25)
    want = _grads(q, k, v, do, mask, params)
    for cfg in (backward.Tiles(32, 32, 4, 1, 32), backward.Tiles(16, 16, 4, 1, 16), backward.Tiles(16, 32, 4, 1, 32)):
        calls, bufs = backward.backward_calls(do, q, k, v, mask, params, [True, True, True, False], cfg)
        for _, c in calls:
            c.run()
        _close([bufs["dq"], bufs["dk"], bufs["dv"]], want)


def test_untuned_when_autotune_is_off(monkeypatch):
    cands = [backward.Tiles(32, 32, 4, 1, 32), backward.Tiles(16, 16, 4, 1, 16)]
    monkeypatch.setattr(backward, "candidates", lambda q: cands)
    timed = _fake_timer(monkeypatch, cands)
    monkeypatch.setenv("ATTNOPT_AUTOTUNE", "0")
    q, k, v, do = _dense_case(33)
    params = AttentionParams(scale=0.25)
    got = backward.attention_backward(do, q, k, v, None, params, [True, True, True, False])[:3]
    _close(got, _grads(q, k, v, do, None, params))
    assert timed == []


def test_gna_backward_tunes_and_every_candidate_is_exact(monkeypatch, tmp_path):
    from attnopt.codegen.gna_exact import reference_gna

    layout = GNALayout((5, 7), (3, 3))
    cands = [gna_backward.Tiles((4, 4), (4, 8), (4, 4), (4, 4)), gna_backward.Tiles((2, 4), (4, 4), (4, 4), (2, 4))]
    monkeypatch.setattr(gna_backward, "candidates", lambda q, ndim, has_mask=False: cands)
    timed = _fake_timer(monkeypatch, cands)
    g = torch.Generator().manual_seed(0)
    S = 1 + 35 + 2
    q = torch.randn(1, 2, S, 16, generator=g) * 2
    k, v, do = (torch.randn(1, 2, S, 16, generator=g) for _ in range(3))
    tl = TokenLayout(layout, 1, (), 2)
    got = gna_backward.attention_backward(do, q, k, v, None, 0.3, tl, [True, True, True, False])[:3]
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference_gna(*xs, None, 0.3, layout, 1, "softmax", (), 2), xs, do.double())
    _close(got, want)
    assert len(timed) == 2
    entry = json.loads(next((tmp_path / "cache").rglob("tune-*.json")).read_text())
    assert entry["key"]["kernel"] == "gna_attention_backward" and entry["config"]["q_tile"] == [2, 4]
    gna_backward.attention_backward(do, q, k, v, None, 0.3, tl, [True, True, True, False])
    assert len(timed) == 2  # remembered


def test_gpu_candidates_put_the_compiled_default_first(monkeypatch):
    """Off the interpreter: several candidates, tiles() the first (what aot.py compiles)."""
    monkeypatch.setattr(backward.generator, "interpreter_active", lambda: False)
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 80)):
        q = torch.empty(1, 1, 8, d, dtype=dtype)
        assert backward.candidates(q)[0] == backward.tiles(q) and len(backward.candidates(q)) >= 2
        for ndim in (1, 2, 3):
            for has_mask in (False, True):
                c = gna_backward.candidates(q, ndim, has_mask)
                assert c[0] == gna_backward.tiles(q, ndim, has_mask) and len(c) >= 2
                assert len(set(c)) == len(c)
