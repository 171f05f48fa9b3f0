"""nn.MultiheadAttention under torch.compile(backend="attnopt") (issue 18): dynamo keeps
F.multi_head_attention_forward as one call, which attnopt decomposes into its projections around
attnopt's op (patterns/fused.py `_mha_recipe`). Every configuration below is rewritten and matches
eager; the near misses (dropout active, weights used) are kept with their reason."""
from __future__ import annotations

import pytest
import torch

import attnopt.pipeline.backend as backend_mod
from zoo.sharpen import sharpen_
from zoo.testing import spy_optimize

E, H, B, SQ, SKV = 16, 4, 2, 5, 7


class Wrapped(torch.nn.Module):
    """One nn.MultiheadAttention called the way `call` says; returns the attention output only
    (weights, when computed, are dropped inside the compiled frame) unless `use_weights`;
    `own_causal`: the model builds a causal attn_mask itself (a constant of the graph)."""

    def __init__(self, call: dict, use_weights: bool = False, own_causal: bool = False, **mha):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(E, H, **mha)
        self.call, self.use_weights, self.own_causal = call, use_weights, own_causal

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None):
        if self.own_causal:
            attn_mask = torch.nn.Transformer.generate_square_subsequent_mask(SQ)
        out, w = self.mha(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, **self.call)
        return out + w.sum() if self.use_weights else out


def _build(mha: dict, call: dict, use_weights: bool = False, own_causal: bool = False) -> Wrapped:
    torch.manual_seed(0)
    m = sharpen_(Wrapped(call, use_weights, own_causal, **mha))
    with torch.no_grad():  # biases start at zero: random ones catch a wrong slice of in_proj_bias
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape) * 0.5)
    return m.eval()


def _inputs(mha: dict, masks: str, self_attn: bool) -> tuple:
    g = torch.Generator().manual_seed(1)
    bf = mha.get("batch_first", False)
    skv = SQ if self_attn else SKV

    def seq(s, d):
        return torch.randn((B, s, d) if bf else (s, B, d), generator=g)

    q = seq(SQ, E)
    k = q if self_attn else seq(skv, mha.get("kdim") or E)
    v = q if self_attn else (k if mha.get("vdim") is None and mha.get("kdim") is None else seq(skv, mha.get("vdim") or E))
    kpm = attn = None
    if "kpm" in masks:  # True masks: row 1 pads its last 3 keys
        kpm = torch.zeros(B, skv, dtype=torch.bool)
        kpm[1, skv - 3:] = True
    if "fkpm" in masks:  # float, like a float attn_mask (mixed types make dynamo skip the frame)
        kpm = torch.zeros(B, skv).masked_fill(kpm, float("-inf"))
    if "bool2d" in masks:  # True masks; every query keeps key 0
        attn = torch.rand(SQ, skv, generator=g) < 0.4
        attn[:, 0] = False
    if "float2d" in masks:
        attn = torch.randn(SQ, skv, generator=g)
    if "float3d" in masks:  # [B*H, Sq, Skv], heads merged into the batch
        attn = torch.randn(B * H, SQ, skv, generator=g)
    if "causal" in masks:
        attn = torch.nn.Transformer.generate_square_subsequent_mask(SQ)
    return q, k, v, kpm, attn


# (name, MultiheadAttention kwargs, call kwargs, masks, self-attention)
CASES = [
    ("self_batch_first", dict(batch_first=True), dict(need_weights=False), "", True),
    ("self_seq_first_weights_unused", {}, {}, "", True),
    ("self_weights_per_head_unused", {}, dict(average_attn_weights=False), "kpm", True),
    ("cross_packed_kv", dict(batch_first=True), dict(need_weights=False), "kpm", False),
    ("kdim_vdim_separate", dict(kdim=8, vdim=12, batch_first=True), dict(need_weights=False), "kpm", False),
    ("no_bias", dict(bias=False), dict(need_weights=False), "float2d", False),
    ("bias_kv_zero_attn", dict(add_bias_kv=True, add_zero_attn=True), dict(need_weights=False),
     "fkpm+float2d", False),
    ("bias_kv_weights_unused", dict(add_bias_kv=True, kdim=8, vdim=12), {}, "bool2d", False),
    ("bool_mask_and_kpm", dict(batch_first=True), dict(need_weights=False), "kpm+bool2d", False),
    ("float_mask_3d", {}, dict(need_weights=False), "float3d", False),
    ("dropout_in_eval", dict(dropout=0.3), dict(need_weights=False), "kpm", False),
    ("causal_flag", dict(batch_first=True), dict(need_weights=False, is_causal=True), "causal", True),
    ("causal_hint_with_kpm", {}, dict(need_weights=False, is_causal=True), "causal+fkpm", True),
    ("causal_mask_no_hint", {}, dict(need_weights=False), "causal", True),
]


def _compile_and_run(monkeypatch, model, inputs, **compile_kw):
    seen = spy_optimize(monkeypatch)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*inputs)
        got = torch.compile(model, backend=backend_mod.make_backend("eager"), **compile_kw)(*inputs)
    return ref, got, seen


def _sites(seen):
    return [s for r in seen for s in r.sites]


@pytest.mark.parametrize("name,mha,call,masks,self_attn", CASES, ids=[c[0] for c in CASES])
def test_mha_is_rewritten_and_matches_eager(monkeypatch, name, mha, call, masks, self_attn):
    model = _build(mha, call)
    ref, got, seen = _compile_and_run(monkeypatch, model, _inputs(mha, masks, self_attn))
    sites = _sites(seen)
    assert [s.status for s in sites] == ["rewritten"], [(s.status, s.reason) for s in sites]
    assert sites[0].pattern == "fused:torch_mha_forward"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hint", [True, False])
def test_causal_becomes_the_ops_flag(monkeypatch, hint):
    """is_causal with no key padding and no weights: torch ignores attn_mask and runs SDPA's causal
    path; without the hint the model's own (constant) mask is proven causal. Either way the
    rewrite uses the op's causal flag (no mask tensor)."""
    model = _build(dict(batch_first=True), dict(need_weights=False, is_causal=hint), own_causal=not hint)
    inputs = _inputs(dict(batch_first=True), "causal" if hint else "", True)
    ref, got, seen = _compile_and_run(monkeypatch, model, inputs)
    (site,) = _sites(seen)
    assert site.status == "rewritten" and site.variant == "exact:causal", (site.status, site.variant)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_packed_self_attention_projects_once(monkeypatch):
    """Self-attention through the packed in_proj_weight: one in-projection matmul (as torch's own),
    not one per q, k, v."""
    graphs = []
    real = backend_mod._inner_compile

    def keep(inner, gm, example_inputs):
        graphs.append(gm)
        return real(inner, gm, example_inputs)

    monkeypatch.setattr(backend_mod, "_inner_compile", keep)
    model = _build(dict(batch_first=True), dict(need_weights=False))
    ref, got, seen = _compile_and_run(monkeypatch, model, _inputs(dict(batch_first=True), "", True))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.nn.functional.linear) == 2, gm.code  # in- and out-projection
    assert torch.ops.attnopt.attention.default in targets
    assert torch.nn.functional.multi_head_attention_forward not in targets


def test_dynamic_shapes(monkeypatch):
    """dynamic=True: the rewrite holds for symbolic batch and sequence lengths."""
    mha = dict(add_bias_kv=True, add_zero_attn=True)
    model = _build(mha, dict(need_weights=False))
    ref, got, seen = _compile_and_run(monkeypatch, model, _inputs(mha, "fkpm+float2d", False), dynamic=True)
    assert [s.status for s in _sites(seen)] == ["rewritten"], [(s.status, s.reason) for s in _sites(seen)]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["dropout_in_training", "weights_used"])
def test_near_misses_are_kept_with_a_reason(monkeypatch, case):
    if case == "dropout_in_training":  # no_grad: the backend rewrites inference graphs only
        model = _build(dict(dropout=0.3), dict(need_weights=False)).train()
        want = "dropout active"
    else:
        model = _build({}, {}, use_weights=True)
        want = "weights are used"
    inputs = _inputs({}, "", True)
    torch.manual_seed(0)
    ref, got, seen = _compile_and_run(monkeypatch, model, inputs)
    (site,) = _sites(seen)
    assert site.status == "kept" and want in site.reason, (site.status, site.reason)
    if case == "weights_used":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
