"""optimize(nn.Module, example) keeps the sizes the model leaves free symbolic: the optimized
GraphModule runs at other batch sizes and sequence lengths (and equals the original there), a size
the model fixes stays fixed with an error that names it, and the export mirrors nested inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.frontends.fx import export_module
from zoo import hf

TOL = 1e-4
# (batch, length) pairs other than the example's (2, 16); 1 runs although export saw >= 2
SIZES = [(3, 16), (5, 9), (2, 33), (1, 7)]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def _check_sizes(model, optimized, make_inputs, sizes=SIZES):
    for b, s in sizes:
        args, kwargs = make_inputs(b, s)
        with torch.no_grad():
            ref = hf.first_tensor(model(*args, **kwargs))
            got = hf.first_tensor(optimized(*args, **kwargs))
        assert got.shape == ref.shape
        assert _rel(got, ref) <= TOL, (b, s, _rel(got, ref))


def _text(b: int, s: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed + 7 * b + s)
    ids = torch.randint(3, hf.VOCAB, (b, s), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    if s > 3:
        am[-1, s - 3:] = 0  # the last row is padded, so the mask is not all ones
    return (), {"input_ids": ids, "attention_mask": am}


def _symbolic_dims(ep) -> int:
    return sum(isinstance(d, torch.SymInt) and not d.node.expr.is_number
               for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
               for d in getattr(n.meta.get("val"), "shape", ()))


# ---- handwritten ---------------------------------------------------------------------------

class SdpaBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, s, d))


class PaddedAttention(nn.Module):
    """Decomposed attention with an additive key-padding mask built from an int mask."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, attention_mask):
        b, s, d = x.shape
        h, hd = self.heads, d // self.heads
        q, k, v = (p(x).view(b, s, h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
        o = torch.softmax(scores, dim=-1) @ v
        return self.o(o.transpose(1, 2).reshape(b, s, d))


def _x(b, s, seed=0):
    return torch.randn(b, s, 32, generator=torch.Generator().manual_seed(seed + 31 * b + s))


def test_sdpa_module_runs_at_other_sizes():
    torch.manual_seed(0)
    model = SdpaBlock().eval()
    res = attnopt.optimize(model, (_x(2, 16),))
    assert [s.status for s in res.sites] == ["rewritten"]
    _check_sizes(model, res.model, lambda b, s: ((_x(b, s, 1),), {}))


def test_decomposed_padding_mask_runs_at_other_sizes():
    torch.manual_seed(0)
    model = PaddedAttention().eval()
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, 12:] = 0
    res = attnopt.optimize(model, {"x": _x(2, 16), "attention_mask": am})
    assert [s.status for s in res.sites] == ["rewritten"]

    def inputs(b, s):
        _, kw = _text(b, s)
        return (), {"x": _x(b, s, 2), "attention_mask": kw["attention_mask"]}
    _check_sizes(model, res.model, inputs)


# ---- transformers ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert_eager", "llama_eager", "mistral_eager", "bart_eager"])
def test_text_model_runs_at_other_sizes(name):
    """Padding, causal, a sliding window (mistral, 8 wide: lengths 9 and 33 cross it) and
    cross-attention between two lengths (bart: encoder lengths vary, the decoder's stays: its
    constant causal mask is the op's flag at that length)."""
    pytest.importorskip("transformers")
    zm = hf.build(name)
    res = attnopt.optimize(zm.model, zm.kwargs)
    assert res.sites_rewritten == len(zm.expected), res.to_json()

    dec = zm.kwargs.get("decoder_input_ids")

    def inputs(b, s, dec_len=None):
        args, kw = _text(b, s)
        if dec is not None:
            kw["decoder_input_ids"] = torch.randint(3, hf.VOCAB, (b, dec_len or dec.shape[1]),
                                                    generator=torch.Generator().manual_seed(s))
        return args, kw
    _check_sizes(zm.model, res.model, inputs)
    if dec is not None:
        # BART's decoder self-attention mask is constant (no decoder mask given): it becomes the
        # op's causal flag, proven at the example's decoder length, which the guard names
        with pytest.raises(Exception, match=r"decoder_input_ids.size\(\)\[1\] == 10"):
            res.model(*inputs(2, 16, dec_len=7)[0], **inputs(2, 16, dec_len=7)[1])


def test_vit_runs_at_other_batch_sizes_and_names_the_fixed_image_size():
    pytest.importorskip("transformers")
    zm = hf.build("vit_eager")
    res = attnopt.optimize(zm.model, zm.kwargs)
    assert res.sites_rewritten == len(zm.expected), res.to_json()

    def pixels(b, _s):
        return (), {"pixel_values": torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))}
    _check_sizes(zm.model, res.model, pixels, [(1, 0), (3, 0), (5, 0)])
    # The position embeddings fix the image size: the model refuses 48x48 too, and the
    # optimized module's guard names the size it was exported at.
    big = torch.randn(2, 3, 48, 48)
    with pytest.raises(Exception):
        zm.model(pixel_values=big)
    with pytest.raises(Exception, match=r"pixel_values.size\(\)\[2\] == 32"):
        res.model(pixel_values=big)


# ---- sizes the model or torch fix ------------------------------------------------------------

class FixedLength(nn.Module):
    """A learned bias over a fixed 16x16 score grid: the model fixes the sequence length."""

    def __init__(self):
        super().__init__()
        self.inner = SdpaBlock()
        self.pos = nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        return self.inner(x + self.pos)


def test_fixed_length_keeps_batch_dynamic_and_names_the_length():
    torch.manual_seed(0)
    model = FixedLength().eval()
    res = attnopt.optimize(model, (_x(2, 16),))
    assert [s.status for s in res.sites] == ["rewritten"]
    _check_sizes(model, res.model, lambda b, s: ((_x(b, 16, 3),), {}), [(1, 16), (4, 16)])
    with pytest.raises(Exception, match=r"x.size\(\)\[1\] == 16"):
        res.model(_x(2, 20))


def test_batch_one_example_is_specialized():
    """torch specializes a dimension of size 1 in the example (0/1 specialization): optimized at
    batch 1, the module runs at batch 1 only (sequence lengths stay free) and says so."""
    torch.manual_seed(0)
    model = SdpaBlock().eval()
    res = attnopt.optimize(model, (_x(1, 16),))
    assert [s.status for s in res.sites] == ["rewritten"]
    _check_sizes(model, res.model, lambda b, s: ((_x(b, s, 4),), {}), [(1, 9), (1, 40)])
    with pytest.raises(Exception, match=r"x.size\(\)\[0\] == 1"):
        res.model(_x(3, 16))


class QKVInputs(nn.Module):
    """q, k and v are inputs: their head count and head size are symbolic in the export, but the
    rewrite folds SDPA's default scale 1/sqrt(head_dim) and the GQA group into constants."""

    def forward(self, q, k, v):
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))


def _qkv(b, s, h=4, kvh=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed + b * 1000 + s)
    return (torch.randn(b, h, s, d, generator=g), torch.randn(b, kvh, s, d, generator=g),
            torch.randn(b, kvh, s, d, generator=g))


def test_head_sizes_a_rewrite_builds_in_stay_fixed_and_are_named(caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="attnopt"):
        res = attnopt.optimize(QKVInputs(), _qkv(2, 12))
    assert [s.status for s in res.sites] == ["rewritten"]
    assert (res.sites[0].spec.head_dim, res.sites[0].spec.num_heads, res.sites[0].spec.num_kv_heads) == (8, 4, 2)
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "head_dim" in said and "stays at its example size" in said
    _check_sizes(QKVInputs(), res.model, lambda b, s: (_qkv(b, s, seed=1), {}))
    with pytest.raises(Exception, match=r"q.size\(\)\[3\] == 8"):
        res.model(*_qkv(2, 12, d=16))
    with pytest.raises(Exception, match=r"size\(\)\[1\] == [42]"):
        res.model(*_qkv(2, 12, h=8, kvh=2))


# ---- input structure ----------------------------------------------------------------------------

class Nested(nn.Module):
    """Inputs in lists, tuples and dicts, with None, a bool and an int among them."""

    def __init__(self):
        super().__init__()
        self.attn = PaddedAttention()

    def forward(self, x, extras, flag=False, scale=1, nothing=None):
        (a, b), mask = extras["pair"], extras["mask"]
        y = self.attn(x + a * scale + b[0], mask)
        return y * 2 if flag else y


def _nested(b, s, flag=True):
    g = torch.Generator().manual_seed(b * 100 + s)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, s - 2:] = 0
    extras = {"pair": [torch.randn(b, s, 32, generator=g), (torch.randn(1, 32, generator=g),)],
              "mask": mask}
    return (_x(b, s, 5), extras), {"flag": flag, "scale": 3, "nothing": None}


def test_nested_inputs_export_dynamic_and_optimize():
    torch.manual_seed(0)
    model = Nested().eval()
    args, kwargs = _nested(2, 16)
    ep = export_module(model, {**dict(zip(("x", "extras"), args)), **kwargs})
    assert ep.range_constraints and _symbolic_dims(ep) >= 4  # x, pair[0], mask: batch and length
    res = attnopt.optimize(model, {**dict(zip(("x", "extras"), args)), **kwargs})
    assert [s.status for s in res.sites] == ["rewritten"]
    _check_sizes(model, res.model, _nested, [(3, 16), (2, 9), (4, 21)])


def test_static_export_when_the_dynamic_one_fails(monkeypatch, caplog):
    """When the export with dynamic dimensions fails, the module is exported at the example
    shapes, as before, and says why at debug level only."""
    import logging

    from torch.export import Dim

    import attnopt.frontends.fx as fx_front

    # a real export failure: a bound the example violates
    monkeypatch.setattr(fx_front, "auto_dynamic_shapes", lambda *a: {"x": {0: Dim("b", min=5)}})
    torch.manual_seed(0)
    model = SdpaBlock().eval()
    with caplog.at_level(logging.DEBUG, logger="attnopt"):
        res = attnopt.optimize(model, (_x(2, 16),))
    assert [s.status for s in res.sites] == ["rewritten"]
    said = [r for r in caplog.records if "example input shapes only" in r.getMessage()]
    assert said and all(r.levelno == logging.DEBUG for r in said)
    _check_sizes(model, res.model, lambda b, s: ((_x(b, s, 6),), {}), [(2, 16)])
    with pytest.raises(Exception, match=r"x.size\(\)\[0\] == 2"):
        res.model(_x(3, 16))


def test_failed_dynamic_export_leaves_the_inputs_unmarked():
    """A model the dynamic export cannot trace (numpy on a symbolic size, as Cosmos' position
    embedding does) is exported at the example shapes, and the caller's tensors carry no dynamo
    marks afterwards (they made the static fallback fail too)."""
    import numpy as np

    import attnopt

    class NumpySize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.proj(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
            norm = float(np.sqrt(x.numel() / x.shape[-1]))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v) * norm

    m = NumpySize().eval()
    x = torch.randn(2, 6, 8)
    r = attnopt.optimize(m, (x,))
    assert [s.status for s in r.sites] == ["rewritten"]
    assert not hasattr(x, "_dynamo_weak_dynamic_indices") and not hasattr(x, "_dynamo_dynamic_indices")


def test_untraceable_module_is_one_attnopt_error():
    import attnopt
    from attnopt.errors import UnsupportedModel

    class NumpyValues(torch.nn.Module):
        def forward(self, x):
            return x * float(x.sum().numpy())

    with pytest.raises(UnsupportedModel, match="torch.export cannot trace NumpyValues"):
        attnopt.optimize(NumpyValues(), (torch.randn(2, 3),))
