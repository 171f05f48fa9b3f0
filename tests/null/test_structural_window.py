"""A sliding-window mask the analysis proves structural becomes the op's window (torch splice):
HF Mistral without padding gets `attnopt::attention(..., causal, window=(W - 1, 0))` and no mask
tensor, so on CPU the exact window kernel computes only each query run's keys. Near misses keep the
mask: a padding attention_mask (input-dependent), and the ONNX splice (no window form)."""
from __future__ import annotations

import pytest
import torch

import attnopt
from zoo.sharpen import sharpen_

SEQ, WINDOW = 160, 8


def _mistral(impl: str):
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=WINDOW, attn_implementation=impl, return_dict=False, use_cache=False)
    m = MistralModel(cfg).float().eval()
    sharpen_(m, seed=0)
    ids = torch.randint(3, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return m, ids


def _ops(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.attnopt.attention.default]


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_proven_window_mask_becomes_the_ops_window(impl):
    model, ids = _mistral(impl)
    with torch.no_grad():
        res = attnopt.optimize(model, {"input_ids": ids})
        ref, got = model(input_ids=ids)[0], res.model(input_ids=ids)[0]
    assert res.sites_rewritten == 2
    assert {s.variant for s in res.sites} == {f"exact:sliding_window({WINDOW - 1},0)"}
    for n in _ops(res.model):
        mask, _scale, causal, _align, left, right = n.args[3:9]
        assert mask is None and causal and (left, right) == (WINDOW - 1, 0)
    assert _rel(ref, got) <= 1e-4


def test_padding_mask_is_not_a_structural_window():
    model, ids = _mistral("sdpa")
    am = torch.ones_like(ids)
    am[1, -20:] = 0
    with torch.no_grad():
        res = attnopt.optimize(model, {"input_ids": ids, "attention_mask": am})
        ref = model(input_ids=ids, attention_mask=am)[0]
        got = res.model(input_ids=ids, attention_mask=am)[0]
    assert res.sites_rewritten == 2
    assert not any(s.variant.startswith("exact:sliding_window") for s in res.sites)
    assert all(n.args[3] is not None for n in _ops(res.model))  # the mask still reaches the op
    assert _rel(ref, got) <= 1e-4


class _Banded(torch.nn.Module):
    """Hand-written attention with a constant two-sided band |i - j| <= 5 (local attention), or, with
    `kv_extra`, a band measured from the bottom-right diagonal over a longer key sequence."""

    def __init__(self, sq: int, kv_extra: int = 0):
        super().__init__()
        self.proj = torch.nn.Linear(32, 3 * 32)
        i = torch.arange(sq)[:, None]
        j = torch.arange(sq + kv_extra)[None, :]
        self.register_buffer("band", ((j - i - kv_extra).abs() <= 5))
        self.kv_extra = kv_extra

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.proj(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        if self.kv_extra:
            k = torch.cat([k[:, :, :self.kv_extra], k], 2)
            v = torch.cat([v[:, :, :self.kv_extra], v], 2)
        s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
        p = s.masked_fill(~self.band, float("-inf")).softmax(-1)
        return (p @ v).transpose(1, 2).reshape(B, S, 32)


@pytest.mark.parametrize("kv_extra", [0, 24])
def test_two_sided_band_becomes_a_window(kv_extra):
    torch.manual_seed(0)
    model = _Banded(120, kv_extra).eval()
    sharpen_(model, seed=1)
    x = torch.randn(2, 120, 32)
    with torch.no_grad():
        res = attnopt.optimize(model, (x,))
        ref, got = model(x), res.model(x)
    assert [s.variant for s in res.sites] == ["exact:sliding_window(5,5)"], res.to_json()
    (op,) = _ops(res.model)
    assert op.args[3] is None and not op.args[5] and tuple(op.args[7:9]) == (5, 5)
    assert _rel(ref, got) <= 1e-4
