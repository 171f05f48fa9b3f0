"""Score modifiers: what a site does to its scores besides masking them, as typed values.

`AttentionSpec.score_mods` holds these. Each is a `str` subclass whose text is how reports have
always shown it ("bias", "alibi", "softcap:30.0"): tables join them, `inspect --json` writes them
and the zoo's expectations compare them as strings. Code that needs a modifier's parameter reads
the typed field (`Softcap.cap`) instead of parsing the text back.
"""
from __future__ import annotations

from typing import ClassVar


class ScoreMod(str):
    """A score modifier; subclasses fix `kind` and any parameters."""

    kind: ClassVar[str] = ""

    def __new__(cls) -> ScoreMod:
        return str.__new__(cls, cls.kind)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self):  # pickle / deepcopy rebuild through the typed constructor
        return (type(self), ())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @staticmethod
    def from_text(text: str) -> ScoreMod:
        """The typed value a rendered modifier stands for (plans and callers holding strings)."""
        if isinstance(text, ScoreMod):
            return text
        if text.startswith(Softcap.kind + ":"):
            return Softcap(float(text.split(":", 1)[1]))
        for cls in (Bias, Alibi, BoolMask):
            if text == cls.kind:
                return cls()
        raise ValueError(f"unknown score modifier {text!r}")


class Bias(ScoreMod):
    """An additive bias on the scores that is not a mask (relative positions, T5, DeBERTa)."""

    kind = "bias"


class Alibi(ScoreMod):
    """A bias linear in the key position per head: slope_h * (j - i) up to a per-row constant."""

    kind = "alibi"


class BoolMask(ScoreMod):
    """A boolean mask tensor operand (True attends). Kernel specs name it so a tuned config for a
    boolean mask is not reused for an additive one; detection reports masks in `MaskSpec`."""

    kind = "bool_mask"


class Softcap(ScoreMod):
    """cap * tanh(scores / cap) before the mask (Gemma-2)."""

    kind = "softcap"
    cap: float

    def __new__(cls, cap: float) -> Softcap:
        cap = float(cap)
        self = str.__new__(cls, f"{cls.kind}:{cap}")
        object.__setattr__(self, "cap", cap)
        return self

    def __reduce__(self):
        return (type(self), (self.cap,))

    def __repr__(self) -> str:
        return f"Softcap({self.cap!r})"


def softcap_of(mods) -> float | None:
    """The cap of the first `Softcap` among `mods`, else None."""
    return next((m.cap for m in mods if isinstance(m, Softcap)), None)
