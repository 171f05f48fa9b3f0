"""Raising an ONNX model's default-domain opset, for the standard Attention op (opset 23).

A bump that changes no op's meaning only relabels the opset (every node kept byte for byte);
otherwise onnx.version_converter converts the model, and the values the rewrite needs must
survive the conversion under their names.
"""
from __future__ import annotations

import onnx
from onnx import helper

from attnopt.errors import UnsupportedModel
from attnopt.frontends.onnx_proto import all_nodes

# Ops whose newer versions changed meaning without changing their signature: an opset bump
# must convert them (onnx.version_converter) rather than relabel them.
SEMANTIC_CHANGES = {"GridSample", "DFT", "Resize", "GroupNormalization", "Split", "Pad"}


def default_opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def bump_is_safe(model: onnx.ModelProto, old: int, new: int) -> str | None:
    """None when relabelling the default-domain opset keeps every node's meaning, else why not."""
    seen: set[str] = set()
    for n in all_nodes(model.graph.node):
        if n.domain not in ("", "ai.onnx") or n.op_type in seen:
            continue
        seen.add(n.op_type)
        try:
            s_old = onnx.defs.get_schema(n.op_type, old, "")
            s_new = onnx.defs.get_schema(n.op_type, new, "")
        except Exception:  # noqa: BLE001
            return f"{n.op_type} has no schema at opset {new}"
        if s_old.since_version == s_new.since_version:
            continue
        if n.op_type in SEMANTIC_CHANGES:
            return f"{n.op_type} changed meaning between opsets {old} and {new}"
        old_in = [(i.name, i.option) for i in s_old.inputs]
        new_in = [(i.name, i.option) for i in s_new.inputs]
        if new_in[:len(old_in)] != old_in or any(
                o != onnx.defs.OpSchema.FormalParameterOption.Optional for _, o in new_in[len(old_in):]):
            return f"{n.op_type}'s inputs changed between opsets {old} and {new}"
        if not set(s_old.attributes) <= set(s_new.attributes):
            return f"{n.op_type}'s attributes changed between opsets {old} and {new}"
    return None


def ensure_opset(model: onnx.ModelProto, target: int, needed: set[str]) -> tuple[int | None, str]:
    """Raise the model's default-domain opset to `target` in place; returns the old opset
    (None when no upgrade was needed) and how ("relabel" or "version_converter").

    Relabels the opset when no op used changed meaning (every node kept byte-for-byte),
    else converts with onnx.version_converter and checks that the values in `needed` (what the
    rewrite reads and replaces) survive.
    """
    old = default_opset(model)
    if old >= target:
        return None, ""
    why = bump_is_safe(model, old, target)
    how = "relabel" if why is None else "version_converter"
    if why is None:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
    else:
        from onnx import version_converter

        try:
            conv = version_converter.convert_version(model, target)
        except Exception as e:  # noqa: BLE001
            raise UnsupportedModel(f"cannot raise the model from opset {old} to {target} for the "
                                   f"standard Attention op ({why}; version_converter: "
                                   f"{str(e).splitlines()[0][:160]})") from None
        names = {o for n in conv.graph.node for o in n.output} | {t.name for t in conv.graph.initializer} \
            | {i.name for i in conv.graph.input}
        missing = sorted(needed - names)
        if missing:
            raise UnsupportedModel(f"converting opset {old} -> {target} renamed values the rewrite "
                                   f"needs ({', '.join(missing[:4])})")
        model.CopyFrom(conv)
    need_ir = helper.find_min_ir_version_for([helper.make_opsetid("", target)])
    if model.ir_version < need_ir:
        model.ir_version = need_ir
    return old, how
