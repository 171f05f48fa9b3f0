"""The planted-local demo (examples/dit_local.py, `make demo`) and the layout picture (cli/draw.py).

A tiny DiT-style model (Conv2d patches: a 16 x 16 grid, then 8 text tokens concatenated after it;
random sharpened weights with locality planted in q and k): its token layout is inferred (grid +
trailing text), a plan at max_error 5e-2 picks approximate GNA layouts with the text global, and the
applied plan (run on this CPU) stays within the bound on a held-out input. The plans are for the
a100 profile: at 264 tokens the compiled CPU kernel's per-call cost exceeds SDPA over every score,
so a cpu plan rightly stays exact (tested too; the full-size demo, 1040 tokens, plans for cpu).
Near miss: the same model without planted locality (attention by content alone is global) gets no
approximation. draw_png
with leading / trailing global tokens writes a PNG whose tile axes have integer ticks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attnopt
from attnopt.ir.spec import TokenSegment

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import dit_local as demo  # noqa: E402

GRID, TEXT = 16, 8
SMALL = dict(grid=GRID, text_tokens=TEXT, hidden=32, heads=2, layers=2)


@pytest.fixture(scope="module")
def local():
    torch.manual_seed(0)
    return demo.dit_local(**SMALL)


def test_layout_is_grid_then_text(local):
    model, make = local
    with torch.no_grad():
        rep = attnopt.inspect(model, make(0))
    assert [s.name for s in rep.sites] == ["blocks.0.attn", "blocks.1.attn"]
    for s in rep.sites:
        g = s.spec.token_grid
        assert g is not None, s.spec.token_grid_reason
        assert g.segments == (TokenSegment("grid", GRID * GRID, (GRID, GRID)), TokenSegment("global", TEXT))
        assert (g.shape, g.leading, g.trailing) == ((GRID, GRID), 0, TEXT)


def test_planted_features_are_local():
    """q_i . k_j = -sum a (p_i - p_j)^2 + const_i on the grid; text keys sit `text_offset` below a
    query's own position; text queries see no position."""
    shape, heads, d = (4, 6), 1, 8
    q, k = demo.planted_features(shape, 2, 3, heads, d, text_offset=2.0, sharpness=12.0)
    s = (q.double() @ k.double().T) / d ** 0.5
    p = demo.grid_coords(shape)
    a = demo.axis_scales(shape, 12.0)
    img = slice(2, 2 + 24)
    want = -(a * (p[:, None] - p[None]) ** 2).sum(-1)
    got = s[img, img] - s[img, img].diagonal()[:, None]
    assert torch.allclose(got, want, atol=1e-3)
    own = s[img, img].diagonal()
    assert torch.allclose(s[img, :2], (own - 2.0)[:, None].expand(-1, 2), atol=1e-3)
    assert torch.allclose(s[img, 26:], (own - 2.0)[:, None].expand(-1, 3), atol=1e-3)
    assert s[:2].abs().max() == 0 and s[26:].abs().max() == 0


def test_plan_at_5e2_chooses_gna_with_global_text(local):
    model, make = local
    r = demo.plan_and_measure(model, make, max_error=5e-2, reps=1, target="a100")
    plan = r.pop("_plan")
    for s in plan.sites:
        c = s.choice
        assert c is not None and not c.exact and c.variant.family == "block_sparse_gna", (s.site, s.reason)
        assert c.variant.layout.shape == (GRID, GRID) and (c.leading, c.trailing) == (0, TEXT)
        assert c.speedup > 1.0
    assert r["sites_rewritten"] == 2
    assert r["held_out_rel_l2"] <= 5e-2 and r["calibration_rel_l2"] <= 5e-2
    assert r["predicted_end_to_end_speedup"] > 1.0 and r["measured_end_to_end_speedup"] > 0


def test_near_miss_no_locality_gets_no_approximation():
    """Without the planted positions attention is global: every approximate layout misses the
    budget, so no site is approximated (the exact kernel or the original stays)."""
    torch.manual_seed(0)
    model, make = demo.dit_local(**{**SMALL, "layers": 1}, sharpness=0.0)
    plan = attnopt.plan(model, make(0), policy="approx", max_error=5e-2, target="a100")
    assert plan.sites
    assert all(s.choice is None or s.choice.exact for s in plan.sites), [s.choice.name for s in plan.sites]
    assert any(not w.accepted and "budget" in w.reason for w in plan.walk)


def test_small_sites_stay_exact_on_cpu(local):
    """264 tokens on this CPU: no GNA layout is predicted faster than SDPA (the op's call alone
    costs more), so the sites stay exact, each saying why."""
    model, make = local
    plan = attnopt.plan(model, make(0), policy="approx", max_error=5e-2, target="cpu")
    assert plan.sites and plan.walk == ()
    for s in plan.sites:
        assert s.choice is not None and s.choice.exact
        assert "predicted faster than the exact kernel on local CPU" in s.reason, s.reason


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]


@pytest.mark.parametrize("leading,trailing", [(0, TEXT), (TEXT, 0), (2, 3)])
def test_draw_png_global_strips_and_integer_tile_axes(tmp_path, leading, trailing):
    import matplotlib.pyplot as plt

    from attnopt.cli.draw import central_query, draw_png, layout_figure
    from attnopt.ir import GNALayout
    from attnopt.sparsity.simulator import simulate

    lay = GNALayout((GRID, GRID), (4, 4), (1, 1), (1, 1), (False, False))
    res = simulate(lay, (4, 4), (4, 4))
    p = draw_png(lay, res, tmp_path / "l.png", leading=leading, trailing=trailing)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = layout_figure(lay, res, leading, trailing)
    try:
        fig.canvas.draw()
        tiles = fig.axes[2]
        labels = _labels(tiles)
        assert labels and all(t.replace("\u2212", "-").lstrip("-").isdigit() for t in labels), labels
        texts = [t.get_text() for ax in fig.axes[:2] for t in ax.texts]
        for n, side in ((leading, "leading"), (trailing, "trailing")):
            assert (f"{n} {side} global tokens" in texts) == bool(n), texts
        centre, keys = central_query(lay)
        assert centre == (GRID // 2, GRID // 2) and keys.sum() == 16 and keys[centre]
    finally:
        plt.close(fig)
