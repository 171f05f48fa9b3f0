"""A wide sweep of transformers architectures, built from tiny configs (random, sharpened
weights), for detection and exact-rewrite coverage: does attnopt find the attention in models
written by many different hands?

zoo.hf holds a few models checked field by field in every export flavour; this module trades
depth for breadth: each entry states how many sites the model has and the headline of its first
site (heads, kv heads, mask kind, padding, score modifiers), from reading the model's code.

Builders return (model, kwargs). Text models get zoo.hf's padded batch (row 1's last 4 tokens
masked); vision models a 32x32 image; audio models 1600 samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from zoo.hf import B, VOCAB, _finish, _text_inputs, _TupleOut

TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, use_cache=False)
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              image_size=32, patch_size=8, num_channels=3)


def _cfg(family: str, base: dict, impl: str, kw: dict):
    import transformers

    args = {**base, **kw}
    return getattr(transformers, family + "Config")(**{k: v for k, v in args.items() if v is not None},
                                                   attn_implementation=impl)


def text(family: str, model: str | None = None, seq: int = 16, impl: str = "eager", **kw):
    import transformers

    cfg = _cfg(family, TEXT, impl, kw)
    return getattr(transformers, model or family + "Model")(cfg), _text_inputs(seq)


def vision(family: str, model: str | None = None, impl: str = "eager", **kw):
    import transformers

    cfg = _cfg(family, VISION, impl, kw)
    px = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return getattr(transformers, model or family + "Model")(cfg), {"pixel_values": px}


BART_LIKE = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=1,
                 decoder_start_token_id=2)


def seq2seq(family: str, config: dict = BART_LIKE):
    """An encoder-decoder with one layer each side; `config` holds the family's own size keys."""
    import transformers

    cfg = _cfg(family, dict(vocab_size=VOCAB, d_model=64, use_cache=False), "eager", config)
    inputs = _text_inputs(16)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (B, 10), generator=torch.Generator().manual_seed(1))
    return _TupleOut(getattr(transformers, family + "Model")(cfg)), inputs


def audio(family: str):
    import transformers

    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4, vocab_size=32)
    cfg = _cfg(family, base, "eager", {})
    x = torch.randn(B, 1600, generator=torch.Generator().manual_seed(0))
    return getattr(transformers, family + "Model")(cfg), {"input_values": x}


@dataclass(frozen=True)
class Wide:
    build: Callable[[], tuple[torch.nn.Module, dict[str, torch.Tensor]]]
    sites: int
    first: dict[str, Any]  # num_heads, num_kv_heads, mask kind, padding, score_mods of site 0
    notes: str = ""


def _first(heads=4, kv=None, mask="none", padding=False, mods=()) -> dict[str, Any]:
    return {"num_heads": heads, "num_kv_heads": heads if kv is None else kv, "mask": mask,
            "padding": padding, "score_mods": tuple(mods)}


CAUSAL_PAD = dict(mask="causal", padding=True)
PAD = dict(mask="padding", padding=True)

WIDE: dict[str, Wide] = {
    # decoder LLMs
    "qwen2": Wide(lambda: text("Qwen2", num_key_value_heads=2), 2, _first(kv=2, **CAUSAL_PAD)),
    "qwen3": Wide(lambda: text("Qwen3", num_key_value_heads=2, head_dim=16), 2, _first(kv=2, **CAUSAL_PAD)),
    "gemma": Wide(lambda: text("Gemma", num_key_value_heads=1, head_dim=16), 2, _first(kv=1, **CAUSAL_PAD)),
    "gemma2": Wide(lambda: text("Gemma2", num_key_value_heads=2, head_dim=16, sliding_window=8, seq=24), 2,
                   _first(kv=2, mask="sliding_window", padding=True, mods=("softcap:50.0",))),
    "gemma3text": Wide(lambda: text("Gemma3Text", num_key_value_heads=2, head_dim=16, sliding_window=8, seq=24),
                       2, _first(kv=2, mask="sliding_window", padding=True)),
    "phi3": Wide(lambda: text("Phi3", num_key_value_heads=2, pad_token_id=0), 2, _first(kv=2, **CAUSAL_PAD)),
    "phi": Wide(lambda: text("Phi"), 2, _first(**CAUSAL_PAD)),
    "falcon": Wide(lambda: text("Falcon"), 2, _first(kv=1, **CAUSAL_PAD)),
    "gpt_neox": Wide(lambda: text("GPTNeoX"), 2, _first(**CAUSAL_PAD)),
    "gptj": Wide(lambda: text("GPTJ", rotary_dim=8), 2, _first(**CAUSAL_PAD)),
    "opt": Wide(lambda: text("OPT", ffn_dim=128, word_embed_proj_dim=64), 2, _first(**CAUSAL_PAD)),
    "bloom": Wide(lambda: text("Bloom"), 2, _first(mods=("alibi",), **CAUSAL_PAD),
                  "heads merged into the batch around the softmax; ALiBi as baddbmm's input"),
    "mpt": Wide(lambda: text("Mpt", d_model=64, n_heads=4, n_layers=2), 2, _first(mods=("alibi",), **CAUSAL_PAD),
                "ALiBi added, then masked_fill(finfo.min) with an input-dependent mask"),
    "codegen": Wide(lambda: text("CodeGen", rotary_dim=8, n_ctx=64), 2, _first(**CAUSAL_PAD),
                    "(q k^T + mask) / scale: the mask is added before the scale"),
    "stablelm": Wide(lambda: text("StableLm", num_key_value_heads=2), 2, _first(kv=2, **CAUSAL_PAD)),
    "olmo2": Wide(lambda: text("Olmo2", num_key_value_heads=2), 2, _first(kv=2, **CAUSAL_PAD)),
    "starcoder2": Wide(lambda: text("Starcoder2", num_key_value_heads=2, sliding_window=None), 2,
                       _first(kv=2, **CAUSAL_PAD)),
    "cohere": Wide(lambda: text("Cohere", num_key_value_heads=2), 2, _first(kv=2, **CAUSAL_PAD)),
    "granite": Wide(lambda: text("Granite", num_key_value_heads=2), 2, _first(kv=2, **CAUSAL_PAD)),
    "mixtral": Wide(lambda: text("Mixtral", num_key_value_heads=2, num_local_experts=2, sliding_window=None), 2,
                    _first(kv=2, **CAUSAL_PAD)),
    "gpt_bigcode": Wide(lambda: text("GPTBigCode", multi_query=True), 2, _first(kv=1, **CAUSAL_PAD)),
    "gpt2_sdpa": Wide(lambda: text("GPT2", impl="sdpa"), 2, _first(**CAUSAL_PAD)),
    "qwen2_sdpa": Wide(lambda: text("Qwen2", num_key_value_heads=2, impl="sdpa"), 2, _first(kv=2, **CAUSAL_PAD)),
    # encoders
    "roberta": Wide(lambda: text("Roberta", pad_token_id=1, max_position_embeddings=80), 2, _first(**PAD)),
    "distilbert": Wide(lambda: text("DistilBert", dim=64, hidden_dim=128, n_heads=4, n_layers=2), 2, _first(**PAD)),
    "electra": Wide(lambda: text("Electra", embedding_size=64), 2, _first(**PAD)),
    "albert": Wide(lambda: text("Albert", embedding_size=32), 2, _first(**PAD)),
    "deberta_v2": Wide(lambda: text("DebertaV2"), 2, _first(mask="tensor", padding=False),
                       "[B*H] bmm's with a [B, H] view around the softmax; query x key padding"),
    "deberta_v3": Wide(lambda: text("DebertaV2", relative_attention=True, position_buckets=8,
                                    pos_att_type=["p2c", "c2p"], max_relative_positions=-1, share_att_key=True,
                                    norm_rel_ebd="layer_norm"), 2,
                       _first(mask="tensor", padding=False, mods=("bias",)),
                       "disentangled c2p/p2c scores added in the merged layout; scale 1/sqrt(3d)"),
    "modernbert": Wide(lambda: text("ModernBert", local_attention=8, global_attn_every_n_layers=2, seq=24,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                    sep_token_id=2), 2, _first(**PAD)),
    "xlm_roberta": Wide(lambda: text("XLMRoberta", pad_token_id=1, max_position_embeddings=80), 2, _first(**PAD)),
    "mpnet": Wide(lambda: text("MPNet", pad_token_id=1, max_position_embeddings=80), 2,
                  _first(mods=("bias",), **PAD)),
    "ernie": Wide(lambda: text("Ernie"), 2, _first(**PAD)),
    "funnel": Wide(lambda: text("Funnel", block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128,
                                num_hidden_layers=None, hidden_size=None, num_attention_heads=None,
                                intermediate_size=None), 4, _first(mods=("bias",), **PAD),
                   "relative positional scores; the padding mask is subtracted (s - INF * (1 - mask))"),
    "clip_text": Wide(lambda: text("CLIPText", model="CLIPTextModel"), 2, _first(**CAUSAL_PAD)),
    # vision
    "dinov2": Wide(lambda: vision("Dinov2", mlp_ratio=2), 2, _first()),
    "beit": Wide(lambda: vision("Beit", use_relative_position_bias=True), 2, _first(mods=("bias",))),
    "vitmae": Wide(lambda: vision("ViTMAE", mask_ratio=0.0), 2, _first(),
                   "random patch shuffling in the forward: validation must share the draws"),
    "clip_vision": Wide(lambda: vision("CLIPVision", model="CLIPVisionModel"), 2, _first()),
    "siglip_vision": Wide(lambda: vision("SiglipVision", model="SiglipVisionModel"), 3, _first(),
                          "the pooling head's nn.MultiheadAttention returns its head-averaged weights, "
                          "which the model drops: dead code, so the site is rewritten"),
    "swin": Wide(lambda: vision("Swin", embed_dim=32, depths=[2], num_heads=[4], window_size=4, patch_size=4,
                                num_hidden_layers=None, num_attention_heads=None, hidden_size=None,
                                intermediate_size=None), 2, _first(mods=("bias",))),
    "segformer": Wide(lambda: vision("Segformer", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                     hidden_sizes=[32, 64], patch_sizes=[7, 3], strides=[4, 2],
                                     num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_size=None,
                                     hidden_size=None, intermediate_size=None, num_hidden_layers=None,
                                     image_size=None), 2, _first(heads=1),
                      "keys and values spatially reduced: 64 queries attend 16 keys"),
    # encoder-decoders and audio
    "pegasus": Wide(lambda: seq2seq("Pegasus"), 3, _first(**PAD)),
    "marian": Wide(lambda: seq2seq("Marian"), 3, _first(**PAD)),
    "m2m100": Wide(lambda: seq2seq("M2M100"), 3, _first(**PAD)),
    "t5": Wide(lambda: seq2seq("T5", dict(d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4,
                                          decoder_start_token_id=0)), 3, _first(mods=("bias",), **PAD)),
    "wav2vec2": Wide(lambda: audio("Wav2Vec2"), 2, _first()),
    "hubert": Wide(lambda: audio("Hubert"), 2, _first()),
}
NAMES = list(WIDE)


def build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model, kwargs = WIDE[name].build()
    return _finish(model), kwargs
