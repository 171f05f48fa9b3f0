"""NaN and Inf are infinite error wherever the planner scores candidates or heads.

`max(0.0, nan)` is 0.0: a candidate whose output held NaN where the reference is finite used to
score as error-free (rel_l2 was NaN, the running max dropped it, the per-head ranking zeroed it
with nan_to_num) and could be accepted. Where the reference itself is NaN (a fully masked query
row of the original) the output is undefined and a matching NaN, or the zero attnopt's exact
kernels put there, is equal; +-Inf in the reference must be matched exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnopt.emit.fx as fx_splice
from attnopt.planner.heads import head_errors, head_subsets
from attnopt.planner.metrics import compared, cosine, rel_l2
from attnopt.planner.plan import Plan
from attnopt.planner.search import make_plan

nan, inf = float("nan"), float("inf")


def test_rel_l2_nan_or_inf_in_candidate_is_infinite():
    ref = torch.randn(2, 4, 8, 5)
    for bad in (nan, inf, -inf):
        new = ref.clone()
        new[1, 2, 3, 4] = bad
        assert rel_l2(ref, new) == math.inf, bad
        assert cosine(ref, new) == -1.0, bad
    # the old metric: NaN, which max() then dropped
    new = ref.clone()
    new[0, 0, 0, 0] = nan
    old = float((ref.double() - new.double()).norm() / ref.double().norm())
    assert math.isnan(old) and max(0.0, old) == 0.0
    assert rel_l2(ref, ref.clone()) == 0.0 and cosine(ref, ref.clone()) == pytest.approx(1.0)


def test_nan_in_the_reference_is_undefined_output():
    ref = torch.randn(3, 6)
    ref[1] = nan  # a fully masked row of the original: 0/0
    same = ref.clone()
    assert rel_l2(ref, same) == 0.0  # matching NaN is equal
    zeros = ref.nan_to_num(0.0)  # what attnopt's exact kernels return there (validation's rule)
    assert rel_l2(ref, zeros) == 0.0
    moved = same.clone()
    moved[0, 0] += 1.0  # a finite position that moved is still measured
    assert 0 < rel_l2(ref, moved) < math.inf
    moved[2, 1] = nan  # NaN where the reference is finite is not
    assert rel_l2(ref, moved) == math.inf


def test_inf_in_the_reference_must_be_matched():
    ref = torch.tensor([1.0, inf, -inf, 2.0])
    assert rel_l2(ref, ref.clone()) == 0.0
    for i, v in ((1, -inf), (1, nan), (1, 5.0), (2, inf)):
        new = ref.clone()
        new[i] = v
        assert rel_l2(ref, new) == math.inf, (i, v)
    unbounded, ok = compared(ref, ref.clone())
    assert not unbounded.any() and ok.tolist() == [True, False, False, True]


def test_head_errors_rank_a_nan_head_last():
    torch.manual_seed(0)
    ref = torch.randn(2, 4, 6, 3)  # [B, H, S, D], out_perm identity
    new = ref + 1e-3 * torch.randn_like(ref)
    new[1, 2, 5, 0] = nan  # head 2
    errs = head_errors(ref, new, [0, 1, 2, 3], None)
    assert errs[2] == np.inf and np.isfinite(errs[[0, 1, 3]]).all()
    assert all(2 not in sub for sub in head_subsets(errs, 4))
    # padded query rows are ignored, NaN there included
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5] = False
    assert np.isfinite(head_errors(ref, new, [0, 1, 2, 3], valid)).all()
    # NaN in the reference (a fully masked row) matched by the candidate: not an error
    ref2, new2 = ref.clone(), ref.clone()
    ref2[0, 1, 0], new2[0, 1, 0] = nan, nan
    assert (head_errors(ref2, new2, [0, 1, 2, 3], None) == 0).all()


from zoo.small import Attn, Net  # noqa: E402,F401


def _poison_site(monkeypatch, site: str):
    """Every spliced approximation (a recipe with a GNA layout) at `site` puts one NaN into the
    site's output, as a broken kernel might; the site's exact kernel is left alone."""
    real = fx_splice.splice

    def splice(gm, recipes):
        new_gm, nodes = real(gm, recipes)
        if any(r.site == site and r.layout is not None for r in recipes):
            n = next(n for n in new_gm.graph.nodes if n.name == nodes[site])
            with new_gm.graph.inserting_after(n):
                p = new_gm.graph.call_function(_one_nan, (n,))
            n.replace_all_uses_with(p, delete_user_cb=lambda u: u is not p)
            new_gm.recompile()
            nodes = {**nodes, site: p.name}
        return new_gm, nodes

    monkeypatch.setattr(fx_splice, "splice", splice)


def _one_nan(x):
    y = x.clone()
    y.view(-1)[0] = float("nan")
    return y


@pytest.fixture(scope="module")
def model():
    # default init, 257 tokens: windows over the 256 after the first are cheaper on an H100 and
    # accurate enough, so a generous budget accepts approximations at both sites
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 257, 32),)


def test_planner_rejects_a_nan_producing_candidate(model, monkeypatch):
    m, x = model
    clean = make_plan(m, x, policy="approx", max_error=1.0, target="h100")
    assert set(clean.approximate_sites) == {"blocks.0", "blocks.1"}  # the test has teeth
    _poison_site(monkeypatch, "blocks.0")
    plan = make_plan(m, x, policy="approx", max_error=1.0, target="h100")
    assert plan.approximate_sites == ["blocks.1"]
    assert plan.site("blocks.0").choice.exact
    tried = [w for w in plan.walk if w.site == "blocks.0"]
    assert tried and all(not w.accepted and w.alone_rel_l2 == math.inf for w in tried)
    assert math.isfinite(plan.measured["rel_l2"])
    # unbounded errors survive the JSON round trip (JSON has no infinity: "inf")
    again = Plan.from_json(plan.dumps())
    assert again == plan and '"inf"' in plan.dumps()


def test_sites_left_exact_say_why():
    """Under the approx policy a site that keeps its exact kernel says why: no candidate (and
    which), or none held within the budget (issue 18: reasons everywhere)."""
    import attnopt

    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.b = torch.nn.Linear(32, 96), torch.nn.Linear(32, 4)

        def forward(self, x):
            B, S, _ = x.shape
            q, k, v = self.p(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
            bias = self.b(x).permute(0, 2, 1)[:, :, None, :]  # computed from the input
            s = q @ k.transpose(-1, -2) * 0.35 + bias
            return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, S, 32)

    torch.manual_seed(0)
    plan = attnopt.plan(Biased().eval(), (torch.randn(1, 300, 32),), policy="approx", max_error=0.05)
    assert [s.status for s in plan.sites] == ["planned"]
    assert "no approximate candidates" in plan.sites[0].reason and "inputs" in plan.sites[0].reason
    attnopt.Plan.from_json(plan.dumps())  # the reason round-trips
