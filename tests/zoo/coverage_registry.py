"""The coverage sweep's one registry: every `Wide` entry of zoo.hf_wide (transformers text,
vision, audio), zoo.diffusers_wide (diffusers transformers, UNet, VAE) and zoo.vision_wide
(windowed / rel-pos / mask-unit vision, audio, more text), by unique name.

bench/coverage.py and tests/null/test_coverage_zoo.py read it. HEADLINE_GAPS lists the models
whose first site attnopt reports differently from what the model's code means (the `first` of
the entry), with attnopt's headline and why; the sites are still found and rewritten exactly.
"""
from __future__ import annotations

from typing import Any

import torch

from zoo import diffusers_wide, hf_wide, vision_wide
from zoo.hf import _finish

_PARTS = (hf_wide.WIDE, diffusers_wide.WIDE, vision_wide.WIDE)
ALL: dict[str, hf_wide.Wide] = {k: v for part in _PARTS for k, v in part.items()}
assert len(ALL) == sum(map(len, _PARTS)), "duplicate model names across the zoo.*_wide modules"
NAMES = list(ALL)
NEW = [*diffusers_wide.NAMES, *vision_wide.NAMES]  # added after the 48 of hf_wide

_NOT_KEY_PADDING_SHAPE = ("attnopt proves key padding only from a [batch, keys] input; here the "
                          "keep-mask input is shorter than the keys ({}), so mask analysis says "
                          "'the mask depends on input(s) [...] that are not [batch, keys] padding masks' "
                          "and reports kind 'tensor' (the rewrite passes the mask on and stays exact)")


def _head(heads: int, mask: str, padding: bool = False, mods: tuple = ()) -> dict[str, Any]:
    return {"num_heads": heads, "num_kv_heads": heads, "mask": mask, "padding": padding, "score_mods": mods}


HEADLINE_GAPS: dict[str, tuple[dict[str, Any], str]] = {
    "qwenimage": (_head(4, "tensor"), _NOT_KEY_PADDING_SHAPE.format(
        "cat(text mask [B, 8], ones [B, 16]) over the joint [text, image] keys")),
    "mochi": (_head(8, "tensor"), _NOT_KEY_PADDING_SHAPE.format(
        "the text pool's mask [B, 8] F.pad-ed with one always-kept key")),
    "prior": (_head(2, "tensor"), _NOT_KEY_PADDING_SHAPE.format(
        "the mask [B, 8] F.pad-ed over the 4 extra embeddings, plus a -10000 causal matrix")),
    "speech2text": (_head(4, "tensor"), _NOT_KEY_PADDING_SHAPE.format(
        "the [B, 20] frame mask subsampled to 10 keys by the conv stack (row lengths via sum)")),
}


def build(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model (eval, fp32, sharpened weights) and its example kwargs."""
    torch.manual_seed(0)
    model, kwargs = ALL[name].build()
    return _finish(model), kwargs
