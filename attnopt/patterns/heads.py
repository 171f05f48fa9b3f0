"""Head and batch structure around the score contraction: how many heads, merged or not, repeated.

Models spell the same [batch, heads, seq, dim] tensors in several layouts: 4-D [B, H, S, D],
heads merged into the batch as [B*H, S, D] (BLOOM, DeBERTa), or GQA's kv heads repeated before
the product (repeat_kv: unsqueeze -> expand -> reshape; ONNX Tile; repeat_interleave). These
helpers read the head counts back from shapes, preferring static sizes and falling back to the
probe inputs for sizes exporters left symbolic (head axes are structural, never data-dependent).
"""
from __future__ import annotations

from attnopt.ir import LAYOUT_OPS, Graph
from attnopt.patterns.values import numel

TRANSPARENT = frozenset({"cast", "identity"})  # value-preserving ops the matchers walk through


def head_split(graph: Graph, split: str, merged: str) -> tuple | None:
    """(B, H) when `split` is the [B, H, Sq, Skv] view of `merged`'s [B*H, Sq, Skv] (either may
    be the producer), with H static."""
    ss, ms = graph.shape(split), graph.shape(merged)
    if ss is None or ms is None or len(ss) != 4 or len(ms) != 3:
        return None
    b, h = ss[0], ss[1]
    if not isinstance(h, int):  # heads are structural: a symbol (dynamic=True) has its probe value
        h = probed_dims(graph, split, [1], [h])[0]
    if not isinstance(h, int) or tuple(ss[2:]) != tuple(ms[1:]) or (isinstance(b, int) and ms[0] != b * h):
        return None
    return (b, h)


def unmerged_view(graph: Graph, nid: str, labels: str, heads: int) -> tuple[str, str] | None:
    """For a rank-3 operand whose axis 0 merges [B, H]: the 4-D tensor it is a view of (through
    transposes of the last two axes and casts) and its labels, axis 0 split into X, Y."""
    lab = labels
    for _ in range(6):
        op, shape = graph.op(nid), graph.shape(nid)
        if shape is None or len(shape) != 3:
            return None
        ins = graph.inputs_of(nid)
        if op in TRANSPARENT:
            nid = ins[0]
        elif op == "transpose":
            perm = graph.attr(nid, "perm")
            if perm is None or tuple(perm)[0] != 0:
                return None
            lab = "".join(lab[list(perm).index(i)] for i in range(3))
            nid = ins[0]
        elif op == "reshape":
            src = graph.shape(ins[0])
            if src is None or len(src) != 4 or src[1] != heads or tuple(src[2:]) != tuple(shape[1:]):
                return None
            return ins[0], "XY" + lab[1:]
        else:
            return None
    return None


def probed_dims(graph: Graph, nid: str, axes: list[int], dims: list) -> list:
    """`dims` with the non-static entries replaced by their size on the probe inputs."""
    if all(isinstance(d, int) for d in dims) or graph.evaluator is None:
        return dims
    try:
        shape = graph.evaluator.probe_shape(nid)
    except Exception:  # noqa: BLE001 - stay symbolic when the value cannot be computed
        return dims
    return [d if isinstance(d, int) else int(shape[a]) for d, a in zip(dims, axes)]


def static_dim(*dims):
    """The same size seen on several tensors: the first static one (exporters lose some)."""
    return next((d for d in dims if isinstance(d, int)), dims[0])


def dim_product(xs) -> int | str:
    out: int | str = 1
    for x in xs:
        if isinstance(x, int) and isinstance(out, int):
            out *= x
        else:
            out = f"{out}*{x}" if out != 1 else x
    return out


def repeat_factor(graph: Graph, nid: str) -> int | None:
    """How many times k's heads were repeated on its way into the score matmul (GQA).

    Recognizes repeat_kv (unsqueeze -> expand -> reshape merging (kv_heads, n_rep)), ONNX
    Tile on the inserted axis, and repeat_interleave, through layout ops and scalar scales.
    The factor is read from element counts (expand/tile only grow size-1 axes, layout ops keep
    the count), so exporters that lose the expanded shape still give it exactly.
    """
    start = numel(graph.shape(nid))
    cur = nid
    for _ in range(12):
        op = graph.op(cur)
        if op == "repeat":
            return int(graph.attr(cur, "repeats"))
        if op == "expand" or graph.attr(cur, "tiles"):  # broadcast or tiled (ONNX Tile) values
            src = graph.inputs_of(cur)[0]
            s_in = graph.shape(src)
            if s_in is None or len(s_in) < 5 or s_in[0] == 1:
                return None  # a batch broadcast, or not the repeat_kv form
            n_in = numel(s_in)
            if start and n_in and start % n_in == 0 and start > n_in:
                return start // n_in
            s_out = graph.shape(cur)
            if s_out is not None and len(s_in) == len(s_out):
                grown = [o // i for i, o in zip(s_in, s_out)
                         if isinstance(i, int) and isinstance(o, int) and i == 1 and o > 1]
                if len(grown) == 1:
                    return grown[0]
            return None
        if op in LAYOUT_OPS or op == "cast":
            cur = graph.inputs_of(cur)[0]
            continue
        if op in ("mul", "div"):
            a, b = graph.inputs_of(cur)
            if numel(graph.shape(b)) == 1:
                cur = a
                continue
            if op == "mul" and numel(graph.shape(a)) == 1:
                cur = b
                continue
        return None
    return None


def _through_identity(graph: Graph, nid: str) -> str:
    """`nid`'s value before any chain of `identity` ops (contiguous, clone, full slices, same-dtype
    casts): the same values in the same shape."""
    for _ in range(8):
        if graph.op(nid) != "identity":
            break
        nid = graph.inputs_of(nid)[0]
    return nid


def kv_group_source(graph: Graph, nid: str) -> tuple[str, int] | None:
    """(x, n) when `nid` is x [B, Hkv, S, D] with every KV head repeated n times in place, so head h
    of `nid` is head h // n of x (the order attnopt's op and SDPA's enable_gqa give a query head
    its KV head); else None.

    Proven from the ops and their shapes, never from element counts: transformers' repeat_kv
    (x[:, :, None] or unsqueeze(2), a reshape inserting the unit axis right after the head axis,
    then expand growing that axis alone to n, then reshape merging [Hkv, n] into Hkv * n heads),
    or repeat_interleave(n, dim=1), with identity ops (contiguous, full slices) anywhere between.
    A repeat that tiles the heads instead ([B, 1, Hkv, S, D] expanded on axis 1: head h is x's
    head h % Hkv) or repeats another axis is None.
    """
    cur = _through_identity(graph, nid)
    out = graph.shape(nid)
    if out is None or len(out) != 4:
        return None
    if graph.op(cur) == "repeat":
        x = _through_identity(graph, graph.inputs_of(cur)[0])
        xs, n = graph.shape(x), graph.attr(cur, "repeats")
        if (not graph.attr(cur, "interleave") or graph.attr(cur, "dim") != 1 or not isinstance(n, int)
                or n < 2 or xs is None or len(xs) != 4 or (out[0], out[2], out[3]) != (xs[0], xs[2], xs[3])):
            return None
        hkv, h = probed_dims(graph, x, [1], [xs[1]])[0], probed_dims(graph, nid, [1], [out[1]])[0]
        return (x, n) if isinstance(hkv, int) and h == hkv * n else None
    if graph.op(cur) != "reshape":
        return None
    e = _through_identity(graph, graph.inputs_of(cur)[0])
    es = graph.shape(e)
    if graph.op(e) != "expand" or es is None or len(es) != 5:
        return None
    u = _through_identity(graph, graph.inputs_of(e)[0])
    us = graph.shape(u)
    if graph.op(u) != "reshape" or us is None or len(us) != 5 or us[2] != 1:
        return None
    x = graph.inputs_of(u)[0]
    xs = graph.shape(x)
    # a row-major reshape of [B, Hkv, S, D] to [B, Hkv, 1, S, D] is exactly unsqueeze(2)
    if xs is None or len(xs) != 4 or tuple(us) != (xs[0], xs[1], 1, xs[2], xs[3]):
        return None
    # expand grows axis 2 alone; the reshape merges [Hkv, n] and keeps the rest
    if (es[0], es[1], es[3], es[4]) != (us[0], us[1], us[3], us[4]) or (out[0], out[2], out[3]) != (
            es[0], es[3], es[4]):
        return None
    hkv, n = probed_dims(graph, e, [1, 2], [es[1], es[2]])
    h = probed_dims(graph, nid, [1], [out[1]])[0]
    if not (isinstance(hkv, int) and isinstance(n, int) and isinstance(h, int)) or n < 2 or h != hkv * n:
        return None
    return x, n


def infer_merged_heads(graph: Graph, nid: str) -> int | None:
    """For [B*H, S, D] operands: find the 4-D [B, H, S, D] or [B, S, H, D] tensor above."""
    shape = graph.shape(nid)
    if shape is None or len(shape) != 3:
        return None
    s, d = shape[1], shape[2]
    cur = nid
    for _ in range(8):
        if graph.op(cur) not in LAYOUT_OPS and graph.op(cur) not in ("mul", "div", "cast"):
            return None
        ins = graph.inputs_of(cur)
        if not ins:
            return None
        cur = ins[0] if graph.op(cur) not in ("mul", "div") else next(
            (i for i in ins if graph.shape(i) is not None and len(graph.shape(i)) >= 3), ins[0])
        sh = graph.shape(cur)
        if sh is not None and len(sh) == 4:
            dims = list(sh)
            if dims[-1] == d and s in dims[1:3]:
                rest = dims[1:3]
                rest.remove(s)
                return rest[0] if isinstance(rest[0], int) else None
            if dims[-2] == d and s in dims[1:]:  # pre-transposed k: [B, H, D, S]
                rest = [x for i, x in enumerate(dims[1:]) if i != 1]
                rest.remove(s)
                return rest[0] if isinstance(rest[0], int) else None
    return None
