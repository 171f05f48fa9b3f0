"""Real transformers models from tiny configs, with the attention sites they really contain.

Every builder returns a `ZooModel`: eval mode, fp32, sharpened (see sharpen.py), with example
kwargs that carry real padding (batch 2, the second row's last 4 tokens masked) so no
data-dependent shortcut skips the mask. `expected` lists the attention sites in graph order as
plain dicts of spec fields. The literal values were derived with `probe_sites` (which hooks
transformers' attention dispatch and reads the q/k/v shapes, the scale and the mask/bias tensors
the model really passes) and tests/null/test_zoo.py re-checks them against the models.

Expected site dict:
  {normalizer, num_heads, num_kv_heads, q_len, kv_len, head_dim, scale,
   mask: {kind, left, right, padding}, score_mods: tuple, token_grid: {shape, leading} | None}
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from zoo.sharpen import sharpen_

B = 2
PAD = 4  # padded (masked) tokens at the end of batch row 1
VOCAB = 100


@dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    kwargs: dict[str, torch.Tensor]
    expected: list[dict[str, Any]]
    family: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    args: tuple = ()  # positional example inputs (hand-written cases); HF models use kwargs

    def run(self) -> torch.Tensor:
        """The first output (last hidden state) on the example inputs."""
        with torch.no_grad():
            return first_tensor(self.model(*self.args, **self.kwargs))

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """All example inputs by name, positional ones as arg0, arg1, ..."""
        return {**{f"arg{i}": a for i, a in enumerate(self.args)}, **self.kwargs}


def first_tensor(out: Any) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
    return out


def site(*, heads: int, kv_heads: int | None = None, q: int, kv: int | None = None, hd: int,
         scale: float | None = None, mask: str = "none", left: int | None = None,
         right: int | None = None, padding: bool = False, score_mods: tuple[str, ...] = (),
         grid: tuple[int, ...] | None = None, leading: int = 0,
         normalizer: str = "softmax") -> dict[str, Any]:
    """Build one expected-site dict (defaults: MHA, self-attention, scale 1/sqrt(hd))."""
    if mask == "causal":
        left, right = None, 0
    return {
        "normalizer": normalizer,
        "num_heads": heads,
        "num_kv_heads": heads if kv_heads is None else kv_heads,
        "q_len": q,
        "kv_len": q if kv is None else kv,
        "head_dim": hd,
        "scale": float(hd ** -0.5 if scale is None else scale),
        "mask": {"kind": mask, "left": left, "right": right, "padding": padding},
        "score_mods": tuple(score_mods),
        "token_grid": None if grid is None else {"shape": tuple(grid), "leading": leading},
    }


def _text_inputs(seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, seq), generator=g)
    am = torch.ones(B, seq, dtype=torch.long)
    am[1, seq - PAD:] = 0
    return {"input_ids": ids, "attention_mask": am}


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model = model.float().eval()
    sharpen_(model, seed=0)
    return model


# ---- builders ----------------------------------------------------------------------------

def bert(impl: str = "eager") -> ZooModel:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, return_dict=False, attn_implementation=impl,
                     use_cache=False)
    m = _finish(BertModel(cfg, add_pooling_layer=False))
    s = site(heads=4, q=16, hd=16, mask="padding", padding=True)
    return ZooModel(f"bert_{impl}", m, _text_inputs(16), [s, s], family="bert")


def gpt2(impl: str = "eager") -> ZooModel:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     return_dict=False, attn_implementation=impl, use_cache=False)
    m = _finish(GPT2Model(cfg))
    s = site(heads=4, q=16, hd=16, mask="causal", padding=True)
    return ZooModel(f"gpt2_{impl}", m, _text_inputs(16), [s, s], family="gpt2")


def llama(impl: str = "eager") -> ZooModel:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      return_dict=False, attn_implementation=impl, use_cache=False)
    m = _finish(LlamaModel(cfg))
    s = site(heads=4, kv_heads=2, q=16, hd=16, mask="causal", padding=True)
    return ZooModel(f"llama_{impl}", m, _text_inputs(16), [s, s], family="llama")


def mistral(impl: str = "eager") -> ZooModel:
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=8, return_dict=False, attn_implementation=impl, use_cache=False)
    m = _finish(MistralModel(cfg))
    # masking_utils.sliding_window_overlay: kv_idx > q_idx - sliding_window, i.e. q - kv <= W - 1
    s = site(heads=4, kv_heads=2, q=24, hd=16, mask="sliding_window", left=7, right=0, padding=True)
    return ZooModel(f"mistral_{impl}", m, _text_inputs(24), [s, s], family="mistral")


def vit(impl: str = "eager") -> ZooModel:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, return_dict=False, attn_implementation=impl)
    m = _finish(ViTModel(cfg, add_pooling_layer=False))
    px = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = site(heads=4, q=17, hd=16, grid=(4, 4), leading=1)
    return ZooModel(f"vit_{impl}", m, {"pixel_values": px}, [s, s], family="vit")


def t5_encoder(impl: str = "eager") -> ZooModel:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=32, return_dict=False, attn_implementation=impl, use_cache=False)
    m = _finish(T5EncoderModel(cfg))
    # T5 does not scale scores (scaling=1.0); the relative position bias of layer 0 is reused by
    # layer 1, so both sites add the same learned bias.
    s = site(heads=4, q=16, hd=16, scale=1.0, mask="padding", padding=True, score_mods=("bias",))
    return ZooModel(f"t5enc_{impl}", m, _text_inputs(16), [s, s], family="t5")


class _TupleOut(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids, return_dict=True)
        return tuple(v for v in out.to_tuple() if isinstance(v, torch.Tensor))


def bart(impl: str = "eager") -> ZooModel:
    from transformers import BartConfig, BartModel

    cfg = BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, max_position_embeddings=64, attn_implementation=impl,
                     use_cache=False)
    # BartModel.forward breaks with return_dict=False in transformers 5.x (reads
    # decoder_outputs.last_hidden_state from a tuple), so a thin wrapper returns the tuple.
    m = _finish(_TupleOut(BartModel(cfg)))
    kw = _text_inputs(16)
    kw["decoder_input_ids"] = torch.randint(3, VOCAB, (B, 10), generator=torch.Generator().manual_seed(1))
    enc = site(heads=4, q=16, hd=16, mask="padding", padding=True)
    dec = site(heads=4, q=10, hd=16, mask="causal")  # no decoder_attention_mask given
    cross = site(heads=4, q=10, kv=16, hd=16, mask="padding", padding=True)
    return ZooModel(f"bart_{impl}", m, kw, [enc, enc, dec, cross, dec, cross], family="bart")


BUILDERS: dict[str, Callable[[], ZooModel]] = {
    "bert_eager": lambda: bert("eager"),
    "bert_sdpa": lambda: bert("sdpa"),
    "gpt2_eager": gpt2,
    "llama_eager": lambda: llama("eager"),
    "llama_sdpa": lambda: llama("sdpa"),
    "mistral_eager": lambda: mistral("eager"),
    "vit_eager": lambda: vit("eager"),
    "t5enc_eager": lambda: t5_encoder("eager"),
    "bart_eager": lambda: bart("eager"),
}
NAMES = list(BUILDERS)


def build(name: str) -> ZooModel:
    torch.manual_seed(0)
    return BUILDERS[name]()


# ---- probing: what the model really passes to its attention function ----------------------

@contextlib.contextmanager
def record_attention_calls():
    """Record every call of transformers' attention dispatch (eager or sdpa) in call order."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls: list[dict[str, Any]] = []
    orig = ALL_ATTENTION_FUNCTIONS.get_interface

    def get_interface(impl, default):
        fn = orig(impl, default)

        def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
            calls.append({"module": module, "query": query.detach(), "key": key.detach(),
                          "value": value.detach(), "attention_mask": attention_mask,
                          "args": args, "kwargs": kwargs, "impl": impl})
            return fn(module, query, key, value, attention_mask, *args, **kwargs)

        return wrapped

    ALL_ATTENTION_FUNCTIONS.get_interface = get_interface
    try:
        yield calls
    finally:
        del ALL_ATTENTION_FUNCTIONS.get_interface  # back to the class method


def _allowed(t: torch.Tensor | None, shape: tuple[int, int, int]) -> torch.Tensor:
    """[B, q, kv] bool: which pairs a mask/bias tensor lets through (very negative = masked)."""
    b, q, kv = shape
    if t is None:
        return torch.ones(b, q, kv, dtype=torch.bool)
    if t.dtype == torch.bool:
        a = t
    else:
        a = t > torch.finfo(t.dtype).min / 2
    a = a.expand(a.shape[0], a.shape[1], q, kv).all(dim=1)  # over heads
    return a.expand(b, q, kv)


def _classify(allowed: torch.Tensor, padded_row: int | None) -> dict[str, Any]:
    """Mask kind from the [B, q, kv] allowed pattern (self-aligned diagonal, bottom-right)."""
    b, q, kv = allowed.shape
    off = kv - q
    i = torch.arange(q)[:, None]
    j = torch.arange(kv)[None, :]
    full = allowed[0]  # row 0 carries no padding
    d = (j - i - off)
    padding = bool((allowed[padded_row] != full).any()) if padded_row is not None and b > padded_row else False
    if padding:  # key padding = whole key columns removed in the padded row only
        diff = full & ~allowed[padded_row]
        cols = diff.any(0)
        assert bool((allowed[padded_row][:, cols] == False).all()), "padding is not key-only"  # noqa: E712
    if bool(full.all()):
        return {"kind": "padding" if padding else "none", "left": None, "right": None, "padding": padding}
    if bool((full == (d <= 0)).all()):
        return {"kind": "causal", "left": None, "right": 0, "padding": padding}
    right = int(d[full].max())
    left = int(-d[full].min())
    if bool((full == ((d <= right) & (d >= -left))).all()):
        return {"kind": "sliding_window", "left": left, "right": right, "padding": padding}
    return {"kind": "tensor", "left": None, "right": None, "padding": padding}


def probe_sites(zm: ZooModel) -> list[dict[str, Any]]:
    """Derive the expected-site dicts from what the model really passes to attention."""
    padded_row = 1 if ("attention_mask" in zm.kwargs and not bool(zm.kwargs["attention_mask"].all())) else None
    with record_attention_calls() as calls, torch.no_grad():
        zm.model(**zm.kwargs)
    out = []
    cfg = zm.model.config
    for c in calls:
        q, k, kw = c["query"], c["key"], c["kwargs"]
        b, h, ql, hd = q.shape
        kvl = k.shape[2]
        scale = kw.get("scaling", c["args"][1] if len(c["args"]) > 1 else None)
        if c["args"]:
            pass
        scale = hd ** -0.5 if scale is None else float(scale)
        am = c["attention_mask"]
        allowed = _allowed(am, (b, ql, kvl))
        if am is None and kw.get("is_causal", getattr(c["module"], "is_causal", False)) and ql > 1:
            allowed = allowed & torch.ones(ql, kvl, dtype=torch.bool).tril(kvl - ql)
        score_mods: tuple[str, ...] = ()
        pb = kw.get("position_bias")
        if pb is not None:
            allowed = allowed & _allowed(pb, (b, ql, kvl))
            finite = pb[pb > torch.finfo(pb.dtype).min / 2]
            if finite.numel() and float(finite.max() - finite.min()) > 0:
                score_mods = ("bias",)
        rowpad = padded_row if kvl == zm.kwargs.get("attention_mask", torch.ones(1, 0)).shape[-1] else None
        mask = _classify(allowed, rowpad)
        grid = None
        if hasattr(cfg, "image_size") and hasattr(cfg, "patch_size"):
            g = cfg.image_size // cfg.patch_size
            grid = {"shape": (g, g), "leading": ql - g * g}
        out.append({
            "normalizer": "softmax", "num_heads": h, "num_kv_heads": k.shape[1], "q_len": ql,
            "kv_len": kvl, "head_dim": hd, "scale": scale, "mask": mask, "score_mods": score_mods,
            "token_grid": grid,
        })
    return out
