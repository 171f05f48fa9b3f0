"""The greedy walk: which measured approximations a plan keeps, and the hold-out check.

Candidates are sorted by predicted time saved per unit of end-to-end error (alone); each is
tried together with those already accepted (replacing its site's earlier choice when it saves
more) and kept if the measured end-to-end relative L2 stays within `SAFETY * max_error`. Every
step is recorded (Plan.walk: the speedup-vs-error curve).

Hold-out check: choosing approximations by their error on the very inputs they are judged on
overfits (a per-head plan measured 0.078 on its calibration batches and 0.105 on new text at a
0.1 budget), so with two or more calibration batches the last one is held out of the search.
The final plan is run on it; while its error there exceeds SAFETY * max_error (the held-out
batch estimates the error on unseen inputs, so it keeps the same margin), the most recently
accepted approximation is withdrawn (a walk step says so; the site goes back to the choice it
had accepted before, if any, else to exact) and the plan re-checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from attnopt.cost.variants import Candidate
from attnopt.passes.rewrite import Recipe
from attnopt.planner.measure import Measure
from attnopt.planner.plan import Measured, WalkStep

SAFETY = 0.8  # approximations are accepted up to this fraction of max_error on calibration inputs


class Trial(NamedTuple):
    """An approximate candidate measured alone (with the other sites' exact choices)."""
    site: str
    candidate: Candidate
    recipe: Recipe
    rel_l2: float
    cosine: float
    site_rel_l2: float


@dataclass
class Walked:
    """What the walk accepted (per site) and its record."""
    recipes: dict[str, Recipe] = field(default_factory=dict)
    choices: dict[str, Candidate] = field(default_factory=dict)
    measured: dict[str, Measured] = field(default_factory=dict)
    steps: list[WalkStep] = field(default_factory=list)
    holdout_l2: float | None = None  # the final plan's error on the held-out batch, if measured


def greedy_walk(trials: list[Trial], chosen: dict[str, Candidate], chosen_recipe: dict[str, Recipe],
                measure: Measure, e2e_speedup: Callable[[dict[str, Candidate]], float],
                max_error: float) -> Walked:
    """Walk `trials` on top of the exact choices (`chosen`, `chosen_recipe`), then withdraw
    acceptances while the held-out batch (if `measure` has one) is over budget."""
    saved = lambda t: chosen[t[0]].time_s - t[1].time_s  # noqa: E731
    trials = sorted(trials, key=lambda t: saved(t) / max(t[3], 1e-12), reverse=True)
    w = Walked()
    walk, accepted, acc_c, measured_site = w.steps, w.recipes, w.choices, w.measured
    history: list[tuple[str, Recipe, Candidate, Measured]] = []  # acceptances, in order
    for name, c, r, l2, cos, se in trials:
        step = len(walk) + 1
        picks = {**chosen, **acc_c, name: c}
        if name in accepted and saved((name, c)) <= saved((name, acc_c[name])):
            walk.append(WalkStep(step, name, c.name, saved((name, c)), l2, None, None,
                                 e2e_speedup(picks), False,
                                 "saves no more than the site's accepted approximation"))
            continue
        if l2 > SAFETY * max_error:
            walk.append(WalkStep(step, name, c.name, saved((name, c)), l2, None, None,
                                 e2e_speedup(picks), False, "alone exceeds the budget"))
            continue
        trial = {**chosen_recipe, **accepted, name: r}
        tl2, tcos = measure(trial)[:2] if accepted else (l2, cos)
        ok = tl2 <= SAFETY * max_error
        walk.append(WalkStep(step, name, c.name, saved((name, c)), l2, tl2, tcos,
                             e2e_speedup(picks), ok, "" if ok else "combined error exceeds the budget"))
        if ok:  # a later, more aggressive choice at the same site replaces an earlier one
            accepted[name], acc_c[name] = r, c
            measured_site[name] = Measured(se, l2, cos)
            history.append((name, r, c, measured_site[name]))
    # the held-out batch: withdraw the latest acceptances while it is over budget. A site whose
    # withdrawn choice had replaced an earlier one gets that one back, and the combination must
    # then pass the calibration budget again too.
    restored = False
    while accepted and measure.holdout:
        hl2, hcos = measure({**chosen_recipe, **accepted}, on_holdout=True)[:2]
        over = hl2 > SAFETY * max_error
        if not over and restored:
            cl2 = measure({**chosen_recipe, **accepted})[0]
            over = cl2 > SAFETY * max_error
        if not over:
            w.holdout_l2 = hl2  # the final plan's: not measured again
            break
        name, _, c, m = history.pop()
        earlier = [h for h in history if h[0] == name]
        rest = {n: x for n, x in acc_c.items() if n != name}
        if earlier:
            rest[name] = earlier[-1][2]
        note = (f"withdrawn: the plan's error on the held-out batch, {hl2:.3g}, exceeds "
                f"{SAFETY:g} x max_error {max_error:g}" if hl2 > SAFETY * max_error else
                "withdrawn: with an earlier choice restored the calibration error exceeds the budget")
        if earlier:
            note += f"; the site's earlier choice {earlier[-1][2].name} is restored"
        walk.append(WalkStep(len(walk) + 1, name, c.name, saved((name, c)), m.e2e_rel_l2, hl2, hcos,
                             e2e_speedup({**chosen, **rest}), False, note))
        if earlier:
            _, accepted[name], acc_c[name], measured_site[name] = earlier[-1]
            restored = True
        else:
            del accepted[name], acc_c[name], measured_site[name]
    return w
