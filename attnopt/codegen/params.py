"""What every kernel is told besides its tensors: the attention's scalar options and its token layout.

A leaf of the kernel layer (it imports nothing from attnopt.codegen): the op modules, the kernel
selection table (select.py) and every kernel (cpu/, triton/, exact.py) take these types, so none of
them has to import another's module to learn them.

Canonical layouts of the tensors these describe (BHSD):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], H % Hkv == 0,
  attn_mask broadcastable to [B, H, Sq, Skv] (bool: True = attend; float: added to the scores),
  out [B, H, Sq, Dv] in q.dtype.
  With a TokenLayout: Sq = Skv = leading + prod(grid.shape) + trailing, the `leading` global tokens
  first, then the grid's tokens flattened row-major, then the `trailing` global tokens.

Schema sentinels: the custom ops' schemas carry "absent" scalars as sentinels (optional scalars are
awkward in schemas and in exported programs), so saved .pt2 programs hold these values:
  window_left / window_right = NO_WINDOW_LIMIT (-1): no limit on that side; softcap = NO_SOFTCAP (0.0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from attnopt.ir import GNALayout

NO_WINDOW_LIMIT = -1
NO_SOFTCAP = 0.0


@dataclass(frozen=True)
class AttentionParams:
    """The op's scalar arguments in Python conventions (None = absent). Hashable: the Triton
    launcher keys its per-case memo on it."""

    scale: float
    causal: bool = False
    causal_alignment: str = "top_left"
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    normalizer: str = "softmax"

    @classmethod
    def from_schema(
        cls,
        scale: float,
        causal: bool,
        causal_alignment: str,
        window_left: int,
        window_right: int,
        softcap: float,
        normalizer: str,
    ) -> "AttentionParams":
        left = None if window_left == NO_WINDOW_LIMIT else int(window_left)
        right = None if window_right == NO_WINDOW_LIMIT else int(window_right)
        return cls(
            scale=float(scale),
            causal=bool(causal),
            causal_alignment=causal_alignment,
            window=None if left is None and right is None else (left, right),
            softcap=None if softcap == NO_SOFTCAP else float(softcap),
            normalizer=normalizer,
        )

    def kwargs(self) -> dict:
        """Keyword arguments of reference.reference_attention."""
        return dict(
            scale=self.scale,
            causal=self.causal,
            causal_alignment=self.causal_alignment,
            window=self.window,
            softcap=self.softcap,
            normalizer=self.normalizer,
        )


@dataclass(frozen=True)
class TokenLayout:
    """The call's token structure beyond `AttentionParams`: `leading` global tokens ([CLS],
    attention sinks: they attend, and are attended by, every token) followed by a GNA `grid`,
    then `trailing` global tokens (joint text tokens after the image grid, SD3 / HunyuanVideo).
    Under a causal grid every pair also needs key <= query, so grid queries see no trailing key.

    `heads` lists the query heads that run the grid (empty: every head); only the reference math
    reads it whole, the other kernels get one head group at a time (gna_op splits them). A layout
    with `grid=None` and leading tokens describes no kernel: the Triton checks refuse it with a
    reason, as they always did. `None` in place of a TokenLayout means dense attention."""

    grid: GNALayout | None = None
    leading: int = 0
    heads: tuple[int, ...] = ()
    trailing: int = 0

    @property
    def globals(self) -> int:
        """Global tokens, leading and trailing."""
        return self.leading + self.trailing

    @property
    def causal(self) -> bool:
        """A causal grid (any dimension): global queries then see keys j <= i only."""
        return self.grid is not None and any(self.grid.causal)


def gna_call_fits(q_len: int, kv_len: int, params: AttentionParams, layout: TokenLayout | None
                  ) -> tuple[bool, str]:
    """What every GNA kernel needs of a call, before its own limits: a grid, causal/window only
    from the grid's flags, and a sequence of exactly `leading` + grid + `trailing` tokens."""
    if layout is None or layout.grid is None:
        return False, "no GNA layout"
    if params.causal or params.window is not None:
        return False, "causal/window come from the GNA layout's own flags, not the op's"
    g = math.prod(layout.grid.shape)
    n = layout.leading + g + layout.trailing
    if q_len != n or kv_len != n:
        return False, (f"sequence lengths {q_len}/{kv_len} != {layout.leading} leading + grid tokens "
                       f"{g}" + (f" + {layout.trailing} trailing" if layout.trailing else ""))
    return True, ""


def as_layout(layout: "TokenLayout | GNALayout | None", leading: int = 0, trailing: int = 0
              ) -> TokenLayout | None:
    """A TokenLayout from what callers hold: a bare GNALayout (plus `leading` / `trailing`), a
    TokenLayout, or None (dense, unless `leading` / `trailing` ask for global tokens)."""
    if isinstance(layout, TokenLayout):
        return layout
    if layout is None and not leading and not trailing:
        return None
    return TokenLayout(layout, int(leading), trailing=int(trailing))
