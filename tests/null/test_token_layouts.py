"""Token layouts as segments (passes/grid.py, passes/token_trace.py): each attention site's
sequence read as ordered grid segments (image / video patches) and global segments (text, class,
register tokens), leading or trailing, adding up to the sequence length.

Diffusers models from zoo.diffusers_wide's tiny configs (random weights): Flux (text first, image
tokens [B, N, C] laid on a grid by the rotary img_ids), SD3 and HunyuanVideo (image first, text
trailing), CogVideoX (text first, a frames x h x w video grid), DiT, PixArt and Wan (image or
video only). Then handwritten modules: joint attention in both orders, and near misses that must
get no layout, with the reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.ir.spec import TokenGrid, TokenSegment
from zoo import diffusers_wide as dw

G = TokenSegment  # TokenSegment(kind, length, shape)


def grid(*shape: int) -> TokenSegment:
    n = 1
    for d in shape:
        n *= d
    return TokenSegment("grid", n, tuple(shape))


def glob(n: int) -> TokenSegment:
    return TokenSegment("global", n)


def _layouts(model, kw) -> list[tuple[str, TokenGrid | None, str]]:
    with torch.no_grad():
        rep = attnopt.inspect(model, kw)
    return [(s.name, s.spec.token_grid, s.spec.token_grid_reason) for s in rep.sites]


# name -> [(site name, segments or None, leading, trailing)]
FLUX_LAYOUT = ((glob(8), grid(4, 4)), 8, 0)
SD3_LAYOUT = ((grid(4, 4), glob(8)), 0, 8)

DIFFUSERS = {
    "flux": [("transformer_blocks.0.attn", *FLUX_LAYOUT),
             ("single_transformer_blocks.0.attn", *FLUX_LAYOUT)],
    "sd3": [("transformer_blocks.0.attn", *SD3_LAYOUT), ("transformer_blocks.1.attn", *SD3_LAYOUT)],
    # one latent frame: the 1 x 4 x 4 video grid is the 4 x 4 image grid (size-1 axes dropped)
    "hunyuan_video": [("context_embedder.token_refiner.refiner_blocks.0.attn", None, 0, 0),
                      ("transformer_blocks.0.attn", *SD3_LAYOUT),
                      ("single_transformer_blocks.0.attn", *SD3_LAYOUT)],
    "cogvideox": [("transformer_blocks.0.attn1", (glob(8), grid(2, 4, 4)), 8, 0)],
    "dit": [("transformer_blocks.0.attn1", (grid(4, 4),), 0, 0),
            ("transformer_blocks.1.attn1", (grid(4, 4),), 0, 0)],
    # the cross attention's layout is its queries' (the keys are text)
    "pixart": [("transformer_blocks.0.attn1", (grid(4, 4),), 0, 0),
               ("transformer_blocks.0.attn2", (grid(4, 4),), 0, 0)],
    "wan": [("blocks.0.attn1", (grid(2, 4, 4),), 0, 0), ("blocks.0.attn2", (grid(2, 4, 4),), 0, 0)],
}


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_diffusers_layouts(name):
    model, kw = getattr(dw, name)()
    got = _layouts(model, kw)
    assert [g[0] for g in got] == [w[0] for w in DIFFUSERS[name]]
    for (site, layout, reason), (_, segs, leading, trailing) in zip(got, DIFFUSERS[name]):
        if segs is None:
            assert layout is None, (site, layout)
            assert reason.startswith("no token layout: no grid"), (site, reason)
            continue
        assert layout is not None, (site, reason)
        assert layout.segments == segs, (site, layout.describe())
        assert (layout.leading, layout.trailing) == (leading, trailing), site
        main = max((s for s in segs if s.kind == "grid"), key=lambda s: s.length)
        assert layout.shape == main.shape and layout.length == sum(s.length for s in segs)
        js = layout.to_json()
        assert js["leading"] == leading and js["trailing"] == trailing
        assert [s["kind"] for s in js["segments"]] == [s.kind for s in segs]


def test_cogvideox_long_text_is_leading():
    """16 text tokens (more than the 8 leading tokens the conv-only rule allowed) before a
    2 x 4 x 4 video: the text is one leading global segment."""
    m = dw._d("CogVideoXTransformer3DModel")(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                             out_channels=4, time_embed_dim=16, text_embed_dim=32, num_layers=1,
                                             sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                             temporal_compression_ratio=4, max_text_seq_length=16)
    kw = dict(hidden_states=dw._rand(2, 2, 4, 8, 8), encoder_hidden_states=dw._rand(2, 16, 32, seed=1),
              timestep=torch.tensor([10, 500]))
    [(_, layout, reason)] = _layouts(m, kw)
    assert layout is not None, reason
    assert layout.segments == (glob(16), grid(2, 4, 4))
    assert (layout.shape, layout.leading, layout.trailing) == ((2, 4, 4), 16, 0)


def test_token_grid_stays_compatible():
    """Readers of `shape`/`leading` keep working: a leading-only layout sums as before, and a
    layout with trailing tokens does not pass for a leading-only one."""
    old = TokenGrid(shape=(4, 4), leading=1)
    assert old.segments == (glob(1), grid(4, 4)) and old.describe() == "4x4+1"
    assert old.to_json() == {"shape": [4, 4], "leading": 1, "trailing": 0,
                             "segments": [{"kind": "global", "length": 1},
                                          {"kind": "grid", "length": 16, "shape": [4, 4]}]}
    sd3 = TokenGrid.from_segments([grid(4, 4), glob(8)])
    assert (sd3.shape, sd3.leading, sd3.trailing) == ((4, 4), 0, 8)
    assert 16 + sd3.leading != sd3.length and sd3.describe() == "4x4|8g"
    two = TokenGrid.from_segments([glob(2), grid(2, 2), glob(3), grid(4, 4), glob(1)])
    assert (two.shape, two.leading, two.trailing) == ((4, 4), 9, 1)
    with pytest.raises(ValueError):
        TokenGrid.from_segments([glob(4)])


# ---- handwritten joint attention ------------------------------------------------------------

B, C, H, D, TEXT = 2, 32, 4, 8, 6


class Joint(nn.Module):
    """Conv patches (4 x 4 from 16 x 16, patch 4) and a text stream, concatenated in either order
    along the sequence, optionally sliced, then one SDPA."""

    def __init__(self, text_first: bool = True, keep: int | None = None, img: tuple[int, int] = (16, 16)):
        super().__init__()
        self.patch = nn.Conv2d(3, C, 4, stride=4)
        self.txt = nn.Linear(16, C)
        self.qkv = nn.Linear(C, 3 * C)
        self.text_first, self.keep = text_first, keep

    def forward(self, image, text):
        x = self.patch(image).flatten(2).transpose(1, 2)
        t = self.txt(text)
        x = torch.cat([t, x] if self.text_first else [x, t], dim=1)
        if self.keep is not None:
            x = x[:, :self.keep]
        q, k, v = self.qkv(x).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


class RopeJoint(nn.Module):
    """Flux-like: image tokens arrive as [B, N, C] (packed outside); rotary ids [N, 3] say where."""

    def __init__(self, conv_grid: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(3, C, 4, stride=4) if conv_grid else None
        self.img = nn.Linear(C, C)
        self.txt = nn.Linear(16, C)
        self.qkv = nn.Linear(C, 3 * C)
        self.freq = nn.Parameter(torch.randn(3, D))

    def forward(self, image, text, txt_ids, img_ids):
        x = self.patch(image).flatten(2).transpose(1, 2) if self.patch is not None else self.img(image)
        x = torch.cat([self.txt(text), x], dim=1)
        ids = torch.cat([txt_ids, img_ids], dim=0)
        ang = ids @ self.freq                      # [S, D]
        q, k, v = self.qkv(x).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)
        q = q * torch.cos(ang) + q.flip(-1) * torch.sin(ang)
        k = k * torch.cos(ang) + k.flip(-1) * torch.sin(ang)
        return F.scaled_dot_product_attention(q, k, v)


def _joint_inputs(img=(16, 16)):
    g = torch.Generator().manual_seed(0)
    return dict(image=torch.randn(B, 3, *img, generator=g), text=torch.randn(B, TEXT, 16, generator=g))


def _ids(h: int, w: int, order=None) -> torch.Tensor:
    ids = dw._ids(h, w)
    return ids if order is None else ids[order]


def _one(model, kw) -> tuple[TokenGrid | None, str]:
    [(_, layout, reason)] = _layouts(model.eval(), kw)
    return layout, reason


@pytest.mark.parametrize("text_first", [True, False], ids=["text_first", "image_first"])
def test_joint_order(text_first):
    layout, reason = _one(Joint(text_first), _joint_inputs())
    assert layout is not None, reason
    want = (glob(TEXT), grid(4, 4)) if text_first else (grid(4, 4), glob(TEXT))
    assert layout.segments == want
    assert (layout.leading, layout.trailing) == ((TEXT, 0) if text_first else (0, TEXT))


def test_rope_ids_lay_packed_tokens_on_a_grid():
    kw = dict(image=torch.randn(B, 8, C), text=torch.randn(B, TEXT, 16), txt_ids=torch.zeros(TEXT, 3),
              img_ids=_ids(2, 4))
    layout, reason = _one(RopeJoint(), kw)
    assert layout is not None, reason
    assert layout.segments == (glob(TEXT), grid(2, 4))


class Packed(nn.Module):
    """Flux's `_pack_latents` inside the model: 2 x 2 patches of [B, C, H, W] latents packed by
    view/permute/reshape into [B, (H/2)(W/2), 4C], then a Linear; text after the image."""

    def __init__(self):
        super().__init__()
        self.img = nn.Linear(16, C)
        self.txt = nn.Linear(16, C)
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, latents, text):
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        x = self.img(x.reshape(b, (h // 2) * (w // 2), c * 4))
        x = torch.cat([x, self.txt(text)], dim=1)
        q, k, v = self.qkv(x).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_patches_packed_by_reshape_permute():
    kw = dict(latents=torch.randn(B, 4, 8, 12), text=torch.randn(B, TEXT, 16))
    layout, reason = _one(Packed(), kw)
    assert layout is not None, reason
    assert layout.segments == (grid(4, 6), glob(TEXT))
    assert (layout.shape, layout.leading, layout.trailing) == ((4, 6), 0, TEXT)


# ---- near misses: no layout, and the reason says why -------------------------------------------

def test_near_miss_slice_keeps_part_of_the_grid():
    """text 6 + a 4 x 4 grid, then the sequence keeps its first 18 tokens: 12 of the grid's 16
    (the conv-only rule would have read 4x4 + 2 leading)."""
    layout, reason = _one(Joint(text_first=True, keep=18), _joint_inputs())
    assert layout is None
    assert "part of a grid" in reason and "12 of its 4x4 grid's 16 tokens" in reason, reason


def test_near_miss_ids_not_a_grid():
    """Position ids whose rows are shuffled enumerate no row-major grid: the image tokens are
    plain tokens, and a layout without a grid is no layout."""
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    kw = dict(image=torch.randn(B, 8, C), text=torch.randn(B, TEXT, 16), txt_ids=torch.zeros(TEXT, 3),
              img_ids=_ids(2, 4, order))
    layout, reason = _one(RopeJoint(), kw)
    assert layout is None
    assert reason.startswith("no token layout: no grid among the segments"), reason


def test_near_miss_grids_disagree():
    """The conv lays the image on 4 x 8 (16 x 32 pixels, patch 4); the rotary ids claim 8 x 4."""
    kw = dict(image=torch.randn(B, 3, 16, 32), text=torch.randn(B, TEXT, 16), txt_ids=torch.zeros(TEXT, 3),
              img_ids=_ids(8, 4))
    layout, reason = _one(RopeJoint(conv_grid=True), kw)
    assert layout is None
    assert "two readings disagree" in reason and "4x8" in reason and "8x4" in reason, reason


def test_near_miss_text_only():
    """Self-attention over text alone (no patch embedding, no ids): no layout."""
    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 3 * C)

        def forward(self, text):
            q, k, v = self.qkv(text).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)

    layout, reason = _one(Text(), dict(text=torch.randn(B, 20, 16)))
    assert layout is None and "no grid" in reason, reason
