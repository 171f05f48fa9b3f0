"""A torch case: the choices as a tiny nn.Module (generated forward() source) and its inputs."""
from __future__ import annotations

import math
from typing import Any

from attnopt.testing.fuzz.grammar import check_choices, scale_value


def _fill_value(c: dict[str, Any]) -> str:
    if c["fill"] == "-inf":
        return "float('-inf')"
    if c["fill"] == "finfo_min":
        return repr(-65504.0 if c["dtype"] == "float16" else -3.4028234663852886e38)
    return repr(-1e4 if c["dtype"] == "float16" else -1e9)


def torch_source(c: dict[str, Any]) -> str:
    """The forward() of the case as Python source (module attributes set up by `torch_module`).
    Only from choices the grammar allows (check_choices): the source is executed."""
    check_choices(c)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    dt = f"torch.{c['dtype']}"
    sc = scale_value(c)
    near = c["near"]
    L: list[str] = []
    args = []
    three = c["product"] in ("bmm", "baddbmm")
    kt_ready = False  # k already [.., D, Sk]
    if c["layout"] == "proj":
        args = ["x"]
        L.append(f"q = self.wq(x).view({B}, {S}, {H}, {D}).transpose(1, 2)")
        if c["ktrans"] == "permute":
            L.append(f"k = self.wk(x).view({B}, {S}, {KVH}, {D}).permute(0, 2, 3, 1)")
            kt_ready = True
        else:
            L.append(f"k = self.wk(x).view({B}, {S}, {KVH}, {D}).transpose(1, 2)")
        L.append(f"v = self.wv(x).view({B}, {S}, {KVH}, {Dv}).transpose(1, 2)")
    elif c["layout"] == "bshd":
        args = ["q", "k", "v"]
        L.append("q = q.transpose(1, 2)")
        if c["ktrans"] == "permute":
            L.append("k = k.permute(0, 2, 3, 1)")
            kt_ready = True
        else:
            L.append("k = k.transpose(1, 2)")
        L.append("v = v.transpose(1, 2)")
    else:
        args = ["q", "k", "v"]
        if c["ktrans"] == "pretransposed":
            kt_ready = True
    if c["mask"] in ("pad_add", "pad_fill"):
        args.append("am")
    if c["mask"] == "dense_input":
        args.append("dm")
    if near == "nonconst_scale":
        args.append("t")
    # GQA: bring k/v to H heads (or leave broadcasting to matmul)
    kdim_s = -1 if kt_ready else -2  # which axis of k is the sequence

    def rep(name: str) -> None:
        n = H // KVH
        if c["gqa"] == "repeat_kv":
            if name == "k" and kt_ready:
                L.append(f"k = k[:, :, None].expand({B}, {KVH}, {n}, {D}, {Sk}).reshape({B}, {H}, {D}, {Sk})")
            else:
                d = D if name == "k" else Dv
                L.append(f"{name} = {name}[:, :, None].expand({B}, {KVH}, {n}, {Sk}, {d}).reshape({B}, {H}, {Sk}, {d})")
        elif c["gqa"] == "repeat_interleave":
            L.append(f"{name} = {name}.repeat_interleave({n}, dim=1)")
    if c["gqa"] in ("repeat_kv", "repeat_interleave"):
        rep("k")
        rep("v")
    # scale on q / k
    s = c["scale"]
    if s == "q_mul":
        L.append(f"q = q * {sc!r}")
    elif s == "q_div":
        L.append(f"q = q / {1 / sc!r}")
    elif s == "k_mul":
        L.append(f"k = k * {sc!r}")
    elif s == "split_sqrt":
        L.append(f"q = q * {math.sqrt(sc)!r}")
    # K^T
    if c["product"] == "einsum":
        kt = "k"
        if s == "split_sqrt":
            L.append(f"k = k * {math.sqrt(sc)!r}")
    else:
        if kt_ready:
            kt = "k"
        else:
            kt = {"transpose": "k.transpose(-2, -1)", "transpose_rev": "k.transpose(-1, -2)",
                  "transpose_pos": "k.transpose(2, 3)", "permute": "k.permute(0, 1, 3, 2)",
                  "pretransposed": "k.transpose(-2, -1)"}[c["ktrans"]]
        L.append(f"kt = {kt}")
        kt = "kt"
        if s == "split_sqrt":
            L.append(f"kt = kt * {math.sqrt(sc)!r}")
    # scores
    Hs = H if c["gqa"] != "broadcast" else H
    if c["product"] in ("matmul",):
        L.append(f"s = q @ {kt}")
    elif c["product"] == "torch_matmul":
        L.append(f"s = torch.matmul(q, {kt})")
    elif c["product"] == "einsum":
        spec = "bhqd,bhdk->bhqk" if kt_ready else "bhqd,bhkd->bhqk"
        L.append(f"s = torch.einsum('{spec}', q, k)")
    else:
        L.append(f"q3 = q.reshape({B * H}, {S}, {D})")
        L.append(f"kt3 = {kt}.reshape({B * H}, {D}, {Sk})")
        if c["product"] == "bmm":
            L.append("s = torch.bmm(q3, kt3)")
        else:
            alpha = sc if s == "alpha" else 1.0
            bias = "self.cbias" if c["mask"] != "none" else f"torch.zeros({S}, {Sk}, dtype={dt})"
            L.append(f"s = torch.baddbmm({bias}.expand({B * H}, {S}, {Sk}), q3, kt3, beta=1.0, alpha={alpha!r})")
    if s == "scores_mul":
        L.append(f"s = s * {'t' if near == 'nonconst_scale' else repr(sc)}")
    elif s == "scores_div":
        L.append(f"s = s / {'t' if near == 'nonconst_scale' else repr(1 / sc)}")
    elif near == "nonconst_scale":
        L.append("s = s * t")
    if c["softcap"]:
        L.append("s = torch.tanh(s / 30.0) * 30.0")
    if near == "extra_op_scores":
        L.append("s = s.abs()")
    # masks
    fill = _fill_value(c)
    m = c["mask"]
    baddbmm_masked = c["product"] == "baddbmm"
    if near == "mask_per_batch":
        L.append(f"s = torch.where(self.pbmask, s, {fill})")
    elif near == "mask_expands":
        L.append("s = s + self.xmask")
    elif baddbmm_masked:
        pass
    elif m == "pad_add":
        lo = "-65504.0" if c["dtype"] == "float16" else "-3.4028234663852886e38"
        L.append(f"s = s + (1.0 - am[:, None, None, :].to({dt})) * {lo}")
    elif m == "pad_fill":
        L.append(f"s = s.masked_fill(am[:, None, None, :] == 0, {fill})")
    elif m == "causal_where":
        L.append(f"s = torch.where(self.tril, s, {fill})")
    elif m == "causal_triu_fill":
        L.append(f"s = s.masked_fill(torch.triu(torch.ones({S}, {Sk}), diagonal=1).bool(), {fill})")
    elif m == "causal_arange":
        L.append(f"s = s.masked_fill(torch.arange({Sk})[None, :] > torch.arange({S})[:, None], {fill})")
    elif m == "causal_buffer_slice":
        big = "self.big[0, 0" if three else "self.big[:, :"
        L.append(f"s = torch.where({big}, :{S}, :{Sk}].bool(), s, {fill})")
    elif m == "sliding":
        L.append(f"i, j = torch.arange({S})[:, None], torch.arange({Sk})[None, :]")
        L.append(f"s = s.masked_fill(~((j <= i) & (i - j < {c.get('window', 3)})), {fill})")
    elif m == "block":
        L.append(f"blk = torch.arange({S}) // 4")
        L.append(f"s = s.masked_fill(blk[:, None] != blk[None, :], {fill})")
    elif m == "bias":
        L.append(f"s = s + self.bias.repeat({B}, 1, 1)" if three else "s = s + self.bias")
    elif m == "dense_input":
        L.append(f"s = torch.where(dm, s, {fill})")
    # normalizer
    ax = -2 if near == "softmax_axis" else -1
    if c["normalizer"] == "sigmoid":
        L.append(f"p = torch.sigmoid(s + {-math.log(Sk)!r})")
    else:
        src = "s"
        if c["cast"] == "float_cast":
            src = "s.float()"
        if c["cast"] == "dtype_arg":
            L.append(f"p = F.softmax(s, dim={ax}, dtype=torch.float32).to({dt})")
        else:
            sm = c["softmax"]
            if sm == "torch_softmax":
                L.append(f"p = torch.softmax({src}, {ax})")
            elif sm == "F_softmax":
                L.append(f"p = F.softmax({src}, dim={ax})")
            elif sm == "method":
                L.append(f"p = {src}.softmax({ax})")
            else:
                dim = (2 if three else 3) if ax == -1 else (1 if three else 2)
                L.append(f"p = torch.softmax({src}, dim={dim})")
            if c["cast"] == "float_cast":
                L.append(f"p = p.to({dt})")
    if c["nan_guard"]:
        L.append("p = torch.where(torch.isnan(p), 0.0, p)")
    if c["dropout"] == "F_dropout":
        L.append("p = F.dropout(p, 0.1, training=False)")
    elif c["dropout"] == "module":
        L.append("p = self.drop(p)")
    if near == "extra_op_probs":
        L.append("p = p * p")
    pp = "p.transpose(-2, -1)" if near == "contract_query" else "p"
    if three:
        L.append(f"v3 = v.reshape({B * H}, {Sk}, {Dv})")
        L.append(f"o = torch.bmm({pp}, v3).view({B}, {H}, {S}, {Dv})")
    elif c["product"] == "einsum":
        L.append(f"o = torch.einsum('bhqk,bhkd->bhqd', {pp}, v)")
    else:
        L.append(f"o = {pp} @ v")
    if c["layout"] in ("proj", "bshd"):
        L.append(f"o = o.transpose(1, 2).reshape({B}, {S}, {H * Dv})")
    ret = "o"
    if near == "probs_returned":
        ret = "o, p"
    elif near == "scores_returned":
        ret = "o, s"
    L.append(f"return {ret}")
    del Hs, kdim_s
    body = "\n".join("        " + x for x in L)
    return f"    def forward(self, {', '.join(args)}):\n{body}\n"


def _tensor_gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def torch_inputs(c: dict[str, Any], seed: int, pad: bool = True, empty_row: bool = False
                 ) -> list[Any]:
    """Inputs for the case; the padding mask pads a random number of trailing keys."""
    import torch

    g = _tensor_gen(seed)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    dt = getattr(torch, c["dtype"])

    def r(*shape):  # sharp attention (x1.5): a wrong scale or mask visibly moves the output
        return (torch.randn(*shape, generator=g) * 1.5).to(dt)
    out: list[Any] = []
    if c["layout"] == "proj":
        out.append(r(B, S, H * D))
    elif c["layout"] == "bshd":
        out += [r(B, S, H, D), r(B, Sk, KVH, D), r(B, Sk, KVH, Dv)]
    else:
        kt = r(B, KVH, D, Sk) if c["ktrans"] == "pretransposed" else r(B, KVH, Sk, D)
        out += [r(B, H, S, D), kt, r(B, KVH, Sk, Dv)]
    if c["mask"] in ("pad_add", "pad_fill"):
        am = torch.ones(B, Sk, dtype=torch.long)
        if pad:
            for b in range(B):
                n = int(torch.randint(1, Sk + 1, (1,), generator=g))
                am[b, n:] = 0
        out.append(am)
    if c["mask"] == "dense_input":
        dm = torch.rand(B, 1, S, Sk, generator=g) < 0.6
        dm[..., 0] = True
        if empty_row:  # one query that may attend to nothing
            dm[0, 0, 0, :] = False
        out.append(dm)
    if c["near"] == "nonconst_scale":
        out.append(torch.tensor(scale_value(c), dtype=dt))
    return out


def torch_module(c: dict[str, Any]):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    check_choices(c)
    src = "class Case(nn.Module):\n" + torch_source(c)
    ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "math": math}
    exec(compile(src, f"<fuzz case {c['seed']}>", "exec"), ns)  # noqa: S102 - generated source
    m = ns["Case"]()
    g = _tensor_gen(c["seed"] + 1)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    dt = getattr(torch, c["dtype"])
    if c["layout"] == "proj":
        for name, o in (("wq", H * D), ("wk", KVH * D), ("wv", KVH * Dv)):
            lin = nn.Linear(H * D, o)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(o, H * D, generator=g) * 2 / math.sqrt(H * D))
            setattr(m, name, lin.to(dt))
    tril = torch.ones(S, Sk, dtype=torch.bool).tril()
    m.register_buffer("tril", tril)
    m.register_buffer("big", torch.ones(32, 32).tril().view(1, 1, 32, 32))
    m.register_buffer("bias", (torch.randn(H, S, Sk, generator=g) * 2).to(dt))
    neg = -65504.0 if c["dtype"] == "float16" else float("-inf")
    cb = torch.zeros(S, Sk).masked_fill(~tril, neg).to(dt) if c["mask"] != "none" else torch.zeros(S, Sk, dtype=dt)
    m.register_buffer("cbias", cb)
    pb = torch.stack([tril, torch.ones(S, Sk, dtype=torch.bool).triu()])[:, None]
    pb = pb[:B] if B <= 2 else torch.cat([pb, pb[:1]])[:B]
    m.register_buffer("pbmask", pb)
    m.register_buffer("xmask", (torch.randn(2, 1, 1, 1, Sk, generator=g)).to(dt))
    m.drop = nn.Dropout(0.1)
    return m.eval()
