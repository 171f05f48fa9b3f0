"""Calls in every spelling (issue 18): SDPA and the ops the fx front end reads, called with any
mix of positional and keyword arguments, are read the same way in dynamo graphs, torch.export
programs (.pt2) and aten graphs; a front-end failure on one graph never fails a compile."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import attnopt
import attnopt.frontends.fx as fx_front
import attnopt.pipeline.backend as backend_mod
from zoo.testing import spy_optimize

B, H, S, D = 2, 4, 16, 8


class KeywordSDPA(torch.nn.Module):
    """One attention through a projection, SDPA spelt the way `mode` says."""

    def __init__(self, mode: str, kv_heads: int = H):
        super().__init__()
        self.mode, self.kv_heads = mode, kv_heads
        self.q = torch.nn.Linear(H * D, H * D)
        self.kv = torch.nn.Linear(H * D, 2 * kv_heads * D)
        self.o = torch.nn.Linear(H * D, H * D)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, H, D).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mode == "all_keywords":
            y = F.scaled_dot_product_attention(query=q, key=k, value=v)
        elif self.mode == "mask_keyword":
            y = F.scaled_dot_product_attention(q, k, value=v, attn_mask=mask, dropout_p=0.0)
        elif self.mode == "causal_keyword":
            y = F.scaled_dot_product_attention(q, key=k, value=v, attn_mask=None, is_causal=True)
        elif self.mode == "scale":
            y = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, scale=0.3)
        elif self.mode == "gqa":
            y = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True,
                                               enable_gqa=True)
        else:
            raise ValueError(self.mode)
        return self.o(y.transpose(1, 2).reshape(b, s, H * D))


class KeywordDecomposed(torch.nn.Module):
    """Decomposed attention with keyword softmax, transpose, matmul and masked_fill."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q, torch.transpose(k, dim0=-2, dim1=-1)) / math.sqrt(D)
        scores = scores.masked_fill(mask=mask.logical_not(), value=float("-inf"))
        p = torch.softmax(scores, dim=-1)
        y = torch.matmul(input=p, other=v)
        return y.transpose(dim0=1, dim1=2).reshape(b, s, H * D)


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(B, S, H * D)
    mask = torch.ones(B, 1, S, S, dtype=torch.bool)
    mask[1, :, :, S - 5:] = False
    return x, mask


def _model(mode: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if mode == "decomposed":
        return KeywordDecomposed().eval()
    return KeywordSDPA(mode, kv_heads=2 if mode == "gqa" else H).eval()


MODES = ["all_keywords", "mask_keyword", "causal_keyword", "scale", "gqa", "decomposed"]


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    err = (got - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-30), err


def _spy(monkeypatch) -> list:
    return spy_optimize(monkeypatch)


@pytest.mark.parametrize("mode", MODES)
def test_compile_backend_reads_keyword_calls(monkeypatch, mode):
    model, inputs = _model(mode), _inputs()
    seen = _spy(monkeypatch)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*inputs)
        got = torch.compile(model, backend=backend_mod.make_backend("eager"))(*inputs)
    _close(got, ref)
    assert sum(r.sites_rewritten for r in seen) == 1, [r.sites for r in seen]


def test_compile_backend_inductor_keyword_sdpa():
    model, inputs = _model("all_keywords"), _inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*inputs)
        got = torch.compile(model, backend="attnopt")(*inputs)
    _close(got, ref)


@pytest.mark.parametrize("mode", MODES)
def test_optimize_module_reads_keyword_calls(mode):
    model, inputs = _model(mode), _inputs()
    res = attnopt.optimize(model, inputs)
    assert res.sites_found == 1 and res.sites_rewritten == 1, res.sites
    with torch.no_grad():
        _close(res.model(*inputs), model(*inputs))


@pytest.mark.parametrize("mode", ["all_keywords", "scale", "gqa"])
def test_pt2_with_keyword_calls_is_rewritten(tmp_path, mode):
    model, inputs = _model(mode), _inputs()
    path = tmp_path / "m.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(model, inputs, strict=False), path)
    res = attnopt.optimize(str(path))
    assert res.sites_rewritten == 1, res.sites
    assert any(n.target is torch.ops.attnopt.attention.default for n in res.model.graph.nodes)
    with torch.no_grad():
        _close(res.model.module()(*inputs), model(*inputs))


def test_aten_sdpa_keyword_arguments_are_read():
    """An aten-level graph whose fused SDPA variant got its arguments by keyword."""
    import torch.fx as fx
    from attnopt.frontends.fx_nodes import sdpa_args, sdpa_qkv

    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    for op, args, kwargs in [
            (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v),
             dict(dropout_p=0.0, is_causal=True, scale=0.5)),
            (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v, 0.0, True),
             dict(scale=0.5)),
            (torch.ops.aten._scaled_dot_product_efficient_attention.default, (),
             dict(query=q, key=k, value=v, attn_bias=None, compute_log_sumexp=False,
                  is_causal=True, scale=0.5)),
            (torch.ops.aten.scaled_dot_product_attention.default, (q,),
             dict(key=k, value=v, is_causal=True, scale=0.5))]:
        n = g.call_function(op, args, kwargs)
        assert sdpa_qkv(n) == (q, k, v)
        assert sdpa_args(n) == (None, 0.0, True, 0.5)


def test_front_end_failure_leaves_graph_unoptimized(monkeypatch, caplog):
    model, inputs = _model("mask_keyword"), _inputs()

    def broken(t, n):
        raise RuntimeError("planted front-end bug")

    monkeypatch.setitem(fx_front._HANDLERS, "scaled_dot_product_attention", broken)
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="attnopt"):
        ref = model(*inputs)
        got = torch.compile(model, backend=backend_mod.make_backend("eager"))(*inputs)
        res = attnopt.optimize(model, inputs)
    _close(got, ref)
    assert res.sites_rewritten == 0
    with torch.no_grad():
        _close(res.model(*inputs), ref)
    warned = [r for r in caplog.records if "planted front-end bug" in r.getMessage()]
    assert len(warned) == 2  # one per graph: the compile's and optimize's


def test_splice_failure_leaves_graph_unoptimized(monkeypatch, caplog):
    import attnopt.pipeline.optimize_torch as opt_torch
    model, inputs = _model("all_keywords"), _inputs()

    def broken(gm, recipes):
        raise ValueError("planted splice bug")

    monkeypatch.setattr(opt_torch, "splice", broken)
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="attnopt"):
        ref = model(*inputs)
        got = torch.compile(model, backend="attnopt")(*inputs)
    _close(got, ref)
    assert any("planted splice bug" in r.getMessage() for r in caplog.records)


def test_inner_compiler_refusing_the_rewrite_runs_the_graph_as_it_came(monkeypatch, caplog):
    model, inputs = _model("all_keywords"), _inputs()
    real = backend_mod._inner_compile

    def refuses_attnopt(inner, gm, example_inputs):
        if any(n.target is torch.ops.attnopt.attention.default for n in gm.graph.nodes):
            raise RuntimeError("planted inner-compiler refusal")
        return real(inner, gm, example_inputs)

    monkeypatch.setattr(backend_mod, "_inner_compile", refuses_attnopt)
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="attnopt"):
        ref = model(*inputs)
        got = torch.compile(model, backend=backend_mod.make_backend("eager"))(*inputs)
    _close(got, ref)
    assert sum("planted inner-compiler refusal" in r.getMessage() for r in caplog.records) == 1


def _tiny_diffusers(name: str):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if name == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4))
        img, txt = 16, 4
        inputs = dict(hidden_states=torch.randn(1, img, 4), encoder_hidden_states=torch.randn(1, txt, 16),
                      pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]),
                      img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)
        return model.eval(), inputs, 2
    video = dict(hidden_states=torch.randn(1, 4, 2, 4, 4), timestep=torch.tensor([1]),
                 encoder_hidden_states=torch.randn(1, 5, 16), return_dict=False)
    if name == "wan":
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
        return model.eval(), video, 2
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    video.update(encoder_attention_mask=torch.ones(1, 5), pooled_projections=torch.randn(1, 8),
                 guidance=torch.tensor([1000.0]))
    return model.eval(), video, 3


@pytest.mark.parametrize("name", ["flux", "wan", "hunyuan_video"])
def test_diffusers_transformer_compiles_and_matches_eager(monkeypatch, name):
    """Flux, Wan and HunyuanVideo call SDPA with keyword arguments: every site is rewritten."""
    model, inputs, n_sites = _tiny_diffusers(name)
    seen = _spy(monkeypatch)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(**inputs)[0]
        got = torch.compile(model, backend=backend_mod.make_backend("eager"))(**inputs)[0]
    _close(got, ref, rel=1e-5)
    assert sum(r.sites_rewritten for r in seen) == n_sites, [r.sites for r in seen]
