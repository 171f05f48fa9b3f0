"""The pattern families, in one registry: each finds its sites and builds their recipes.

A family is a matcher (`anchors`, `match`) and its recipe builder (`recipe`) side by side, with
the frozen details type its matches carry (patterns/details.py). Detection runs every family at
its anchors (passes/detect.py); the rewrite asks the family that owns a site's details for its
recipe (passes/rewrite.py), so nothing downstream branches on pattern names.
"""
from __future__ import annotations

from typing import Protocol

from attnopt.ir import Graph, PatternDetails, Rejection, Site
from attnopt.patterns.decomposed import DecomposedAttention
from attnopt.patterns.fused import FusedAttention
from attnopt.patterns.match import Details, Match
from attnopt.patterns.recipe import Recipe


class PatternFamily(Protocol):
    name: str
    details_type: type[Details]

    def anchors(self, graph: Graph) -> list[str]:
        """The nodes a match may start from (normalizers, fused calls)."""

    def match(self, graph: Graph, anchor: str) -> Match | Rejection | None:
        """A match, a near miss with its reason, or None (nothing worth reporting)."""

    def recipe(self, graph: Graph, site: Site) -> Recipe | str:
        """The site's recipe, or the reason it cannot be rewritten exactly."""


FAMILIES: tuple[PatternFamily, ...] = (DecomposedAttention(), FusedAttention())
_BY_DETAILS = {f.details_type: f for f in FAMILIES}


def family_of(details: PatternDetails) -> PatternFamily:
    """The family whose matches carry `details` (a site's `details`)."""
    family = _BY_DETAILS.get(type(details))
    if family is None:
        raise LookupError(f"no pattern family produces {type(details).__name__} details")
    return family
