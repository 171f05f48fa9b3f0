"""The torch.compile backend with symbolic shapes: `dynamic=True` and automatic dynamic
(`dynamic=None`, one recompile with symbolic sizes after a size changes). Each compiled graph is
rewritten and validated once, at its compile; later calls of any size its guards admit run the
rewritten graph without validating again. What a rewrite must fix (a site's head size and head
counts, a float input it folds into the kernel) is pinned by a dynamo guard, so a call that
changes it recompiles instead of running a rewrite that no longer holds (pipeline/symbolic.py)."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import attnopt.pipeline.backend as backend_mod
import attnopt.pipeline.optimize_torch as opt_torch
from zoo.testing import spy_optimize

H, D = 4, 8
VOCAB = 100
SIZES = [(2, 8), (3, 12), (4, 16), (5, 20)]  # batch >= 2: dynamo specializes a size-1 batch
RAW_H, RAW_D = 6, 10


# ---- models ----------------------------------------------------------------------------------

class ProjectedSDPA(torch.nn.Module):
    """Hand-written attention through F.scaled_dot_product_attention (causal), heads split by view."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.o = torch.nn.Linear(H * D, H * D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, H * D))


class RawSDPA(torch.nn.Module):
    """SDPA on [B, H, S, D] inputs: with dynamic=True even H and D arrive as symbols. (Its sizes,
    RAW_H and RAW_D, differ from every batch and sequence length used: dynamo's duck sizing gives
    equal sizes one symbol and recompiles when they part.)"""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Decomposed(torch.nn.Module):
    """softmax(q k^T / sqrt(d) + padding mask) v, the mask built from an integer attention_mask."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x, attention_mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        scores = scores + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return torch.softmax(scores, dim=-1) @ v


def _sharp(m: torch.nn.Module) -> torch.nn.Module:
    from zoo.sharpen import sharpen_

    torch.manual_seed(0)
    return sharpen_(m, seed=0).eval()


def _padding(b: int, s: int) -> torch.Tensor:
    am = torch.ones(b, s, dtype=torch.long)
    am[1, s - 3:] = 0  # row 1 padded at the end: no query row is fully masked
    return am


def _hf(name: str) -> torch.nn.Module:
    from zoo import hf

    return getattr(hf, name)("eager").model


# name -> (model builder, inputs(b, s) as (args, kwargs), attention sites per graph)
MODELS = {
    "sdpa": (lambda: _sharp(ProjectedSDPA()),
             lambda b, s: ((torch.randn(b, s, H * D, generator=torch.Generator().manual_seed(s)),), {}), 1),
    "raw_sdpa": (lambda: RawSDPA().eval(),
                 lambda b, s: (tuple(torch.randn(b, RAW_H, s, RAW_D, generator=torch.Generator().manual_seed(s + i))
                                     for i in range(3)), {}), 1),
    "decomposed": (lambda: _sharp(Decomposed()),
                   lambda b, s: ((torch.randn(b, s, H * D, generator=torch.Generator().manual_seed(s)),
                                  _padding(b, s)), {}), 1),
    "llama": (lambda: _hf("llama"),
              lambda b, s: ((), {"input_ids": torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(s)),
                                 "attention_mask": _padding(b, s)}), 2),
    "bert": (lambda: _hf("bert"),
             lambda b, s: ((), {"input_ids": torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(s)),
                                "attention_mask": _padding(b, s)}), 2),
}


# ---- instruments -----------------------------------------------------------------------------

def _first(out):
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
    return out


def _rel(got, ref) -> float:
    got, ref = _first(got), _first(ref)
    assert got.shape == ref.shape
    assert not torch.isnan(ref).any() and not torch.isnan(got).any()
    return ((got - ref).abs().max() / ref.abs().max()).item()


class Instruments:
    """Counts graph compiles (backend calls), optimize calls (each validates its graph) and
    validation runs, and keeps the graphs handed to the inner compiler (what actually runs)."""

    def __init__(self, monkeypatch, inner: str = "eager"):
        self.optimized = spy_optimize(monkeypatch)
        self.compiles = 0
        self.validation_runs = 0
        self.compiled_graphs: list[torch.fx.GraphModule] = []
        real_run = opt_torch.run_captured

        def counting_run(*a, **kw):
            self.validation_runs += 1
            return real_run(*a, **kw)

        monkeypatch.setattr(opt_torch, "run_captured", counting_run)
        real_inner = backend_mod._inner_compile

        def keeping_inner(inner_name, gm, example_inputs):
            self.compiled_graphs.append(gm)
            return real_inner(inner_name, gm, example_inputs)

        monkeypatch.setattr(backend_mod, "_inner_compile", keeping_inner)
        be = backend_mod.make_backend(inner)

        def counting_backend(gm, example_inputs, **kw):
            self.compiles += 1
            return be(gm, example_inputs, **kw)

        self.backend = counting_backend

    def attnopt_ops(self, gm: torch.fx.GraphModule) -> int:
        return sum(1 for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("attnopt."))


def _check_compiles(ins: Instruments, sites: int, max_compiles: int) -> None:
    assert 1 <= ins.compiles <= max_compiles, ins.compiles
    assert len(ins.optimized) == ins.compiles, "one optimize (and validation) per graph compile"
    for res in ins.optimized:
        assert res.sites_rewritten == sites, res.sites
    assert ins.compiled_graphs and all(ins.attnopt_ops(g) == sites for g in ins.compiled_graphs), \
        "the graph dynamo runs calls attnopt's kernel for every site"


# ---- dynamic=True ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sdpa", "raw_sdpa", "decomposed", "llama", "bert"])
def test_dynamic_true_matches_eager_and_validates_once(monkeypatch, name):
    build, inputs, sites = MODELS[name]
    model = build()
    ins = Instruments(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ins.backend, dynamic=True)
    for i, (b, s) in enumerate(SIZES):
        args, kwargs = inputs(b, s)
        with torch.no_grad():
            ref = model(*args, **kwargs)
            got = compiled(*args, **kwargs)
        assert _rel(got, ref) <= 1e-4, (b, s)
        if i == 0:
            validated = ins.validation_runs
            assert validated > 0
    assert ins.validation_runs == validated, "a later call validated again"
    _check_compiles(ins, sites, max_compiles=1)


@pytest.mark.parametrize("name", ["decomposed", pytest.param("llama", marks=pytest.mark.long)])  # llama: ~2 min of inductor
def test_dynamic_true_inductor(monkeypatch, name):
    """With inductor after the rewrite. For Llama, inductor's scalar pass sees the guard on the
    folded `scaling` and asks dynamo to retrace with it specialized (a RestartAnalysis the
    backend must let through, not swallow as a compile failure): two backend calls, one graph."""
    build, inputs, sites = MODELS[name]
    model = build()
    ins = Instruments(monkeypatch, inner="inductor")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ins.backend, dynamic=True)
    for i, (b, s) in enumerate(SIZES):
        args, kwargs = inputs(b, s)
        with torch.no_grad():
            assert _rel(compiled(*args, **kwargs), model(*args, **kwargs)) <= 1e-4, (b, s)
        if i == 0:
            validated = ins.validation_runs
    assert ins.validation_runs == validated, "a later call validated again"
    _check_compiles(ins, sites, max_compiles=1 if name == "decomposed" else 2)


# ---- automatic dynamic (dynamic=None) --------------------------------------------------------

@pytest.mark.parametrize("name", ["sdpa", "decomposed", "llama"])
def test_automatic_dynamic_rewrites_the_symbolic_graph_once(monkeypatch, name):
    build, inputs, sites = MODELS[name]
    model = build()
    ins = Instruments(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ins.backend)
    for i, s in enumerate([8, 12, 16, 20, 24]):
        args, kwargs = inputs(2, s)
        with torch.no_grad():
            ref = model(*args, **kwargs)
            got = compiled(*args, **kwargs)
        assert _rel(got, ref) <= 1e-4, s
        if i == 1:  # the recompile with a symbolic sequence length has happened
            validated = ins.validation_runs
    assert ins.validation_runs == validated, "a call after the symbolic recompile validated again"
    _check_compiles(ins, sites, max_compiles=2)
    last = ins.compiled_graphs[-1]
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt)
               for n in last.graph.nodes if n.op == "placeholder"), "the second graph is symbolic"


# ---- generation -------------------------------------------------------------------------------

def test_generate_with_dynamic_cache_validates_per_compile_not_per_step(monkeypatch):
    tf = pytest.importorskip("transformers")
    from zoo.sharpen import sharpen_

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    m = sharpen_(tf.LlamaForCausalLM(cfg), seed=0).eval()
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))

    def generate():
        return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)

    ref = generate()
    ins = Instruments(monkeypatch)
    torch._dynamo.reset()
    fwd = m.forward
    m.forward = torch.compile(fwd, backend=ins.backend)
    try:
        out = generate()
    finally:
        m.forward = fwd
    assert out.shape[1] == 16 and torch.equal(out, ref), (out.tolist(), ref.tolist())
    # 9 forward steps; graphs: the prefill, the first decode step, and automatic dynamic's
    # recompile of the decode step with a symbolic cache length, which serves every later step.
    assert ins.compiles <= 3, ins.compiles
    _check_compiles(ins, sites=2, max_compiles=3)


# ---- what a rewrite pins, and what it leaves dynamic ------------------------------------------

def test_folded_float_is_guarded_other_floats_stay_dynamic(monkeypatch, caplog):
    """dynamic=True passes Llama's `scaling` (and RMSNorm's eps) as float inputs. The rewrite folds
    the scale into the kernel, so it is pinned: changing it recompiles. The eps is not folded and
    stays an input: changing it neither recompiles nor goes wrong."""
    build, inputs, sites = MODELS["llama"]
    model = build()
    ins = Instruments(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ins.backend, dynamic=True)
    args, kwargs = inputs(2, 8)

    def check():
        with torch.no_grad():
            assert _rel(compiled(*args, **kwargs), model(*args, **kwargs)) <= 1e-4

    with caplog.at_level(logging.INFO, logger="attnopt"):
        check()
    assert ins.compiles == 1
    assert any("scaling" in r.message and "folded" in r.message for r in caplog.records), \
        [r.message for r in caplog.records]
    model.norm.variance_epsilon = 1e-3
    check()
    assert ins.compiles == 1, "a float the rewrite did not fold recompiled"
    model.layers[0].self_attn.scaling *= 0.5
    check()
    assert ins.compiles == 2, "a changed folded scale must recompile"
    assert ins.optimized[-1].sites_rewritten == sites


def test_symbolic_head_dim_is_pinned_with_a_reason(monkeypatch, caplog):
    build, _, _ = MODELS["raw_sdpa"]
    model = build()
    ins = Instruments(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ins.backend, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for d in (RAW_D, RAW_D, 16):
        for s in (8, 12):
            q, k, v = (torch.randn(2, RAW_H, s, d, generator=g) for _ in range(3))
            with caplog.at_level(logging.INFO, logger="attnopt"), torch.no_grad():
                assert _rel(compiled(q, k, v), model(q, k, v)) <= 1e-4
    assert ins.compiles == 2, "a new head size recompiles; sequence lengths do not"
    assert all(r.sites_rewritten == 1 for r in ins.optimized)
    assert any("head_dim" in r.message and "guard" in r.message for r in caplog.records), \
        [r.message for r in caplog.records]


def test_a_size_the_rewrite_bakes_in_becomes_a_guard(monkeypatch, caplog):
    """A rewrite is validated at the example sizes only. If it wrote one of them into the graph
    (simulated here: the attention output reshaped to the example's literal [B, H, S, D]), the
    backend runs what the rewrite added on the symbolic sizes, so the assumption becomes a dynamo
    guard (logged with the node) and another size recompiles instead of failing or going wrong."""
    build, inputs, sites = MODELS["decomposed"]
    model = build()
    ins = Instruments(monkeypatch)
    rewrite = opt_torch.optimize_graph_module  # the spy Instruments installed

    def bakes_sizes(gm, example_inputs, **kw):
        new, res = rewrite(gm, example_inputs, **kw)
        if new is not gm:
            node = next(n for n in new.graph.nodes if str(n.target).startswith("attnopt."))
            mask = next(x for x in example_inputs if isinstance(x, torch.Tensor) and x.dtype == torch.long)
            b, s = mask.shape  # the example's concrete sizes (real tensors; int() of a SymInt would guard)
            h, d = H, D
            with new.graph.inserting_after(node):
                baked = new.graph.call_function(torch.reshape, (node, (b, h, s, d)))
            node.replace_all_uses_with(baked, delete_user_cb=lambda u: u is not baked)
            new.recompile()
        return new, res

    monkeypatch.setattr(opt_torch, "optimize_graph_module", bakes_sizes)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ins.backend, dynamic=True)
    with caplog.at_level(logging.INFO, logger="attnopt"):
        for b, s in SIZES[:3]:
            args, _ = inputs(b, s)
            with torch.no_grad():
                assert _rel(compiled(*args), model(*args)) <= 1e-4, (b, s)
    assert ins.compiles == 3, "each size the rewrite baked in recompiles"
    assert any("guard" in r.message and "reshape" in r.message for r in caplog.records), \
        [r.message for r in caplog.records]


def test_dynamic_true_merged_heads(monkeypatch):
    """Heads merged into the batch around the softmax (DeBERTa-style [B*H] bmm's with a
    [B, H, Sq, Skv] view): under dynamic=True the head count of those views is a symbol; it is
    structural, so its probe value proves the split and the site is rewritten."""
    from zoo import handwritten as hw

    case = hw.get("merged_heads_scale_on_kT")
    seen = spy_optimize(monkeypatch)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(case.module, backend=backend_mod.make_backend("eager"), dynamic=True)
        with torch.no_grad():
            got, ref = compiled(*case.args), case.module(*case.args)
    finally:
        torch._dynamo.reset()
    assert _rel(got, ref) <= 1e-4
    sites = [s for r in seen for s in r.sites]
    assert sites and all(s.status == "rewritten" for s in sites), [r.rejected for r in seen]
