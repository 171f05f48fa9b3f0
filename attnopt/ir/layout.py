"""A GNA sparsity layout over a 1-/2-/3-D token grid (semantics: docs/ARCHITECTURE.md, "GNA
semantics"; implemented by sparsity/gna.py)."""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class GNALayout:
    """A Generalized Neighborhood Attention layout over a 1-/2-/3-D token grid.

    Per dimension: window w (>= 2), stride s (1 <= s <= w), dilation d (w*d <= L), causal flag.
    Semantics are those of docs/ARCHITECTURE.md ("GNA semantics"); attnopt.sparsity.gna
    implements them.
    """

    shape: tuple[int, ...]
    window: tuple[int, ...]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    causal: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.shape)
        # Fill defaults per dimension so every field has one entry per grid dimension.
        if not self.stride:
            object.__setattr__(self, "stride", (1,) * n)
        if not self.dilation:
            object.__setattr__(self, "dilation", (1,) * n)
        if not self.causal:
            object.__setattr__(self, "causal", (False,) * n)
        for name in ("window", "stride", "dilation", "causal"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"GNALayout.{name} needs {n} entries, got {getattr(self, name)}")
