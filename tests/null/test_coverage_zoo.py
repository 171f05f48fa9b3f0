"""Breadth beyond zoo.hf_wide: diffusers transformers (Flux, SD3, PixArt, DiT, Wan, HunyuanVideo,
CogVideoX, ...), windowed / rel-pos / mask-unit vision (SAM, ViTDet, Hiera, Swin v2, ...), audio
and more text families (zoo.diffusers_wide, zoo.vision_wide through zoo.coverage_registry).

Module flavour for each: attnopt.optimize(model, kwargs) finds the expected number of sites,
rewrites every one with relative error <= 1e-4, the first site's headline is the expected one
(or attnopt's known different reading, coverage_registry.HEADLINE_GAPS), and the rewritten
program gives the model's output. Models attnopt cannot handle yet are strict xfails whose
reason quotes what attnopt says, so this file turns red when one starts to pass.
Diffusers models keep return_dict=True (a dataclass output) and take keyword inputs.
"""
from __future__ import annotations

import pytest
import torch

import attnopt
from zoo import coverage_registry as reg
from zoo.hf import first_tensor
from zoo.testing import rel_l2, run_first

TOL = 1e-4

# name -> why attnopt misses or keeps its sites (or cannot load the model), in attnopt's words.
XFAIL: dict[str, str] = {
    "lumina2": "UnsupportedModel: torch.export cannot trace it ('TypeError: unhashable type: non-nested SymInt'): "
               "Lumina2 takes len(set(seq_lengths)) of the text mask's row sums (data-dependent)",
    "hidream": "UnsupportedModel: torch.export cannot trace it ('RuntimeError: .numpy() is not supported for "
               "tensor subclasses'): HiDream's MoE inference path calls .cpu().numpy() on expert counts",
}

# Models whose module-flavour check takes more than ~4 s on the 2-core VM.
SLOW = {"mobilevit", "levit", "sam", "hunyuan_video", "mochi", "vae_kl", "flux2"}
# ...and those that take 30 s to 3 min there (make test-long): torch.export's symbolic-shape
# reasoning over window partitions with every input dim dynamic (optimize(nn.Module) exports with
# Dim.AUTO, then again with the sizes a rewrite pins), ~90% of the time in sympy. Their windowed /
# rel-pos sites stay covered in make test by test_views_relpos (Swin, Swin v2, ViTDet, SAM in five
# flavours) and by the other flavours' rows in bench/coverage.py.
LONG = {"swinv2", "donut_swin", "maskformer_swin", "hiera", "vitdet", "mobilevit"}
# ...and, to keep make test inside CI's budget, the models taking 5-15 s there (the dynamic export:
# 5-10x a static one) that no issue names: make test keeps the families the issues name (Flux, SD3,
# PixArt, DiT, Wan, HunyuanVideo, CogVideoX, Cosmos, Mochi, CogView4, SAM, Whisper), one strict
# xfail and every model under 5 s; make test-long runs them all.
LONG |= {"sd_unet", "speech2text", "lumina2", "wavlm", "data2vec_audio", "levit", "data2vec_vision", "sew",
         "timesformer", "musicgen_decoder", "unispeech", "pvt_v2", "qwen3_moe", "hunyuan_dit", "vivit",
         "dinov2_registers", "flux2", "easyanimate", "auraflow", "pvt", "flux_guidance", "vae_kl", "latte",
         "glm", "ast", "helium", "wan_i2v", "sd35", "nemotron", "longcat_image"}
# (2026-12-03: CI landed at 1227 s with the set above; the next five unnamed ones, 5-7 s each.)
LONG |= {"ovis_image", "bria", "chroma", "cogview3plus", "allegro"}


def _params():
    out = []
    for n in reg.NEW:
        marks = []
        if n in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[n]))
        if n in SLOW:
            marks.append(pytest.mark.slow)
        if n in LONG:
            marks.append(pytest.mark.long)
        out.append(pytest.param(n, marks=marks, id=n))
    return out


def _headline(spec) -> dict:
    return {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "mask": spec.mask.kind,
            "padding": spec.mask.padding, "score_mods": tuple(str(m) for m in spec.score_mods)}


def test_registry_is_wide():
    assert len(reg.ALL) >= 75
    assert set(reg.HEADLINE_GAPS) <= set(reg.NEW)
    assert set(XFAIL) <= set(reg.NEW) and SLOW <= set(reg.NEW) and LONG <= set(reg.NEW)


@pytest.mark.parametrize("name", _params())
def test_module(name):
    w = reg.ALL[name]
    model, kw = reg.build(name)
    res = attnopt.optimize(model, kw)
    kept = {s.name: s.reason for s in res.sites if s.status != "rewritten"}
    assert res.sites_found == w.sites, (
        f"found {res.sites_found} sites, want {w.sites}; near misses: {[r.reason for r in res.rejected]}")
    assert not kept, kept
    assert res.rel_error <= TOL
    want = reg.HEADLINE_GAPS[name][0] if name in reg.HEADLINE_GAPS else w.first
    want = {**want, "score_mods": tuple(want["score_mods"])}
    assert _headline(res.sites[0].spec) == want
    assert rel_l2(run_first(res.model, kw), run_first(model, kw)) <= TOL


def test_compile_backend_diffusers_kwargs(monkeypatch):
    """The attnopt torch.compile backend on Flux called with keyword arguments (hidden_states,
    encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids) and its default
    dataclass output: both sites rewritten in dynamo's graph, eager's output.

    backend="attnopt" is make_backend("inductor"); the inner compiler here is eager because
    inductor's CPU code generation for this graph costs ~70 s on the 2-core VM (it passes too),
    while attnopt's part (the graph, its kwargs placeholders, the rewrite) is the same."""
    from attnopt.pipeline.backend import make_backend
    from zoo.testing import spy_optimize

    seen = spy_optimize(monkeypatch)
    model, kw = reg.build("flux")
    want = run_first(model, kw)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=make_backend("eager"))
        torch.manual_seed(0)
        with torch.no_grad():
            out = compiled(**kw)
    finally:
        torch._dynamo.reset()
    assert type(out).__name__ == "Transformer2DModelOutput"
    assert sum(r.sites_rewritten for r in seen) == reg.ALL["flux"].sites
    assert rel_l2(first_tensor(out), want) <= TOL
