"""Measuring a set of recipes: splice them into the model, run calibration, compare outputs.

One `Measure` per planning run holds the references (the original model's outputs on each
calibration batch, site outputs included) so every candidate and combination the search tries
is compared with the same numbers. The held-out batch's references are computed on first use:
a plan that never reaches the hold-out check never runs it.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch.fx as fx

from attnopt.ir import Site
from attnopt.passes.rewrite import Recipe
from attnopt.pipeline.validate import run_captured
from attnopt.planner.heads import head_errors
from attnopt.planner.metrics import cosine, rel_l2, valid_rows, worst


class Measure:
    """measure(recipes, site=None, on_holdout=False): the worst over the batches of
    (end-to-end rel L2, cosine, site rel L2, per-head site errors or None), on the calibration
    batches (or on the held-out batch: end to end only)."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], batches: Sequence[Any],
                 holdout: Sequence[Any], padding_positions: Sequence[int]):
        self.gm = gm
        self.output = {s.name: s.output for s in sites}
        self.batches, self.holdout = list(batches), list(holdout)
        self.positions = padding_positions
        self.refs = [run_captured(gm, b, {s.output for s in sites}) for b in self.batches]
        self.valids = [valid_rows(b, padding_positions) for b in self.batches]

    @functools.cached_property
    def held(self) -> list[tuple[Any, Any, Any]]:
        """(batch, reference outputs, real rows) of the held-out batch, computed once on first use."""
        return [(b, run_captured(self.gm, b, set()), valid_rows(b, self.positions))
                for b in self.holdout]

    def __call__(self, recs: dict[str, Recipe], site: str | None = None, on_holdout: bool = False
                 ) -> tuple[float, float, float, np.ndarray | None]:
        from attnopt.emit.fx import splice

        new_gm, nodes = splice(self.gm, list(recs.values()))
        worst_l2, worst_cos, worst_site = 0.0, 1.0, 0.0
        per_head = None
        runs = self.held if on_holdout else zip(self.batches, self.refs, self.valids)
        for b, (ref, ref_vals), valid in runs:
            want = {nodes[site]} if site else set()
            out, vals = run_captured(new_gm, b, want)
            worst_l2 = worst(worst_l2, rel_l2(ref, out, valid))
            worst_cos = min(worst_cos, cosine(ref, out, valid))
            if site:
                a, o = ref_vals[self.output[site]], vals[nodes[site]]
                worst_site = worst(worst_site, rel_l2(a, o))
                if recs[site].batch_rank == 2 and not recs[site].heads:
                    e = head_errors(a, o, recs[site].out_perm, valid)
                    per_head = e if per_head is None else np.maximum(per_head, e)
        return worst_l2, worst_cos, worst_site, per_head
