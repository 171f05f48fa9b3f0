"""Graphs with side effects are never disturbed (issue 18): attnopt runs a graph more than once
(the evaluator's probes, validation's reference and rewritten runs, padded variants), and none of
those runs may show through. A graph that writes a KV cache in place must leave it exactly as one
call of the original does, and optimize must hand the module back in the modes it had."""
from __future__ import annotations

import logging
import re

import pytest
import torch

import attnopt
from attnopt.frontends.fx_state import mutable_tensors
from attnopt.pipeline.backend import make_backend

S, CACHE, H, D = 4, 12, 2, 8


class CachedAttention(torch.nn.Module):
    """Writes new keys into a cache passed as input and into a registered buffer (accumulating,
    so a second application is visible), counts its calls in a buffer, attends over the cache."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(D, H * D)
        self.k = torch.nn.Linear(D, H * D)
        self.v = torch.nn.Linear(D, H * D)
        self.register_buffer("v_cache", torch.zeros(1, H, CACHE, D))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x, k_cache, pos):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, H, D).transpose(1, 2)
        k = self.k(x).view(b, s, H, D).transpose(1, 2)
        v = self.v(x).view(b, s, H, D).transpose(1, 2)
        k_cache.index_copy_(2, pos, k_cache.index_select(2, pos) + k)
        self.v_cache.index_copy_(2, pos, self.v_cache.index_select(2, pos) + v)
        self.calls.add_(1)
        scores = torch.matmul(q, k_cache.transpose(-1, -2)) / (D ** 0.5)
        return torch.matmul(torch.softmax(scores, dim=-1), self.v_cache)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, S, D, generator=g), torch.randn(1, H, CACHE, D, generator=g),
            torch.arange(2, 2 + S))


def _sites_rewritten(caplog) -> int:
    found = [int(m.group(1)) for r in caplog.records
             for m in [re.search(r"(\d+)/\d+ attention sites rewritten", r.getMessage())] if m]
    return sum(found)


def test_mutated_tensors_are_found_in_the_graph():
    m = CachedAttention().eval()
    ep = torch.export.export(m, _inputs(), strict=False)
    gm = ep.module()
    inputs = list(_inputs())
    found = mutable_tensors(gm, inputs)
    assert any(t is inputs[1] for t in found)  # the cache input
    assert not any(t is inputs[0] for t in found)  # x is only read
    buffers = {id(b) for b in gm.buffers()}
    assert sum(id(t) in buffers for t in found) == 2  # v_cache and calls, nothing else


@pytest.mark.parametrize("backend", ["attnopt", "attnopt-eager"])
def test_in_place_writes_apply_exactly_once_under_compile(backend, caplog):
    torch._dynamo.reset()
    eager_m, comp_m = CachedAttention().eval(), CachedAttention().eval()
    x, cache_e, pos = _inputs()
    cache_c = cache_e.clone()
    with torch.no_grad():
        ref = eager_m(x, cache_e, pos)
    be = "attnopt" if backend == "attnopt" else make_backend(inner="eager")
    with caplog.at_level(logging.INFO, logger="attnopt"), torch.no_grad():
        out = torch.compile(comp_m, backend=be)(x, cache_c, pos)
    assert _sites_rewritten(caplog) >= 1  # validation really ran the graph again
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache_c, cache_e)
    assert torch.equal(comp_m.v_cache, eager_m.v_cache)
    assert int(comp_m.calls) == int(eager_m.calls) == 1


def test_optimize_leaves_inputs_and_buffers_alone():
    m = CachedAttention().eval()
    x, cache, pos = _inputs()
    before = cache.clone()
    res = attnopt.optimize(m, (x, cache, pos))
    assert res.sites_rewritten >= 1
    assert torch.equal(cache, before)
    assert torch.equal(m.v_cache, torch.zeros_like(m.v_cache)) and int(m.calls) == 0


def test_optimize_keeps_each_submodules_mode():
    m = CachedAttention()
    m.train()
    m.k.eval()
    m.v.eval()
    attnopt.optimize(m, _inputs())
    assert m.training and m.q.training
    assert not m.k.training and not m.v.training


# ---- Hugging Face generate with a static (and dynamic) cache --------------------------------

VOCAB = 100


def _hf(name: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif name == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif name == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=4))
    elif name == "gemma2":
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, sliding_window=4))
    else:
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                             n_positions=64, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=0))
    return m.eval()


def _generate(m, backend, cache):
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    fwd = m.forward
    if backend is not None:
        torch._dynamo.reset()
        m.forward = torch.compile(fwd, backend=backend)
    try:
        return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                          do_sample=False, **kw)
    finally:
        m.forward = fwd


CASES = [(name, cache, "attnopt-eager") for name in ("llama", "qwen2", "mistral", "gemma2", "gpt2")
         for cache in ("static", "dynamic")] + [("llama", "static", "attnopt")]


@pytest.mark.parametrize("name,cache,backend", CASES)
def test_generate_matches_eager(name, cache, backend, caplog):
    pytest.importorskip("transformers")
    m = _hf(name)
    ref = _generate(m, None, cache)
    be = "attnopt" if backend == "attnopt" else make_backend(inner="eager")
    with caplog.at_level(logging.INFO, logger="attnopt"):
        out = _generate(m, be, cache)
    assert out.shape[1] == ref.shape[1] == 14
    assert torch.equal(out, ref), (out.tolist(), ref.tolist())
    assert _sites_rewritten(caplog) >= 1


@pytest.mark.parametrize("policy", ["exact", "approx"])
def test_plan_and_planned_optimize_leave_inputs_and_buffers_alone(policy):
    m = CachedAttention().eval()
    x, cache, pos = _inputs()
    before = cache.clone()
    plan = attnopt.plan(m, (x, cache, pos), policy=policy, max_error=1e-2)
    attnopt.optimize(m, (x, cache, pos), plan=plan)
    assert torch.equal(cache, before)
    assert torch.equal(m.v_cache, torch.zeros_like(m.v_cache)) and int(m.calls) == 0


class Writer(torch.nn.Module):
    """Writes through a view of an input, bumps a buffer, and runs BatchNorm in train mode
    (running statistics), as symbolic_trace keeps them (call_method on a view, call_module)."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(D)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x, cache):
        cache.narrow(1, 1, 2).copy_(x[:, :2] * 2)
        self.steps.add_(1)
        return self.bn(x) + cache.sum()


def test_run_captured_puts_back_what_a_traced_graph_writes():
    from attnopt.pipeline.validate import run_captured

    m = Writer().train()
    gm = torch.fx.symbolic_trace(m)
    x, cache = torch.randn(4, D), torch.randn(4, D)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    before = cache.clone()
    out1, _ = run_captured(gm, [x, cache], set())
    out2, _ = run_captured(gm, [x, cache], set())
    torch.testing.assert_close(out1, out2)  # each run starts from the caller's state
    assert torch.equal(cache, before)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k]), k
