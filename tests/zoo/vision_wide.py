"""transformers vision, audio and a few more text models for the coverage sweep: windowed,
relative-position and mask-unit attention (SAM, ViTDet, Hiera, Swin v2 ...), audio encoders and
encoder-decoders (Whisper with its default cache), and text families zoo.hf_wide does not hold.

Same entry type as zoo.hf_wide (`Wide(build, sites, first, notes)`); `sites` and `first` come
from reading each model's code (transformers 5.x). Tiny configs (hidden 16-64, 1-2 layers,
images 32-64 px, short sequences); builders return (model, kwargs), weights are sharpened by
the registry's build().
"""
from __future__ import annotations

import torch

from zoo.hf import B, VOCAB
from zoo.hf_wide import Wide, _first, text

CAUSAL_PAD = dict(mask="causal", padding=True)
PAD = dict(mask="padding", padding=True)


def _px(size: int = 32, channels: int = 3, frames: int | None = None) -> torch.Tensor:
    shape = (B, channels, size, size) if frames is None else (B, frames, channels, size, size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _make(config: str, model: str, impl: str | None = "eager", **kw):
    import transformers

    if impl is not None:
        kw["attn_implementation"] = impl
    cfg = getattr(transformers, config)(**kw)
    return getattr(transformers, model)(cfg)


# ---- windowed / rel-pos / mask-unit vision ------------------------------------------------

def sam_vision():
    m = _make("SamVisionConfig", "SamVisionModel", hidden_size=32, output_channels=16, num_hidden_layers=2,
              num_attention_heads=2, image_size=64, patch_size=8, mlp_dim=64, window_size=4,
              global_attn_indexes=[1], use_rel_pos=True)
    return m, {"pixel_values": _px(64)}


def sam():
    import transformers

    vc = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
              patch_size=8, mlp_dim=64, window_size=4, global_attn_indexes=[1], use_rel_pos=True, num_pos_feats=8)
    cfg = transformers.SamConfig(vision_config=vc,
                                 prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8,
                                                            mask_input_channels=4, num_point_embeddings=4),
                                 mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          mlp_dim=32, iou_head_hidden_dim=16,
                                                          num_multimask_outputs=3, attention_downsample_rate=2))
    cfg._attn_implementation = "eager"
    pts = torch.tensor([[[[10.0, 20.0]]], [[[40.0, 30.0]]]])
    return transformers.SamModel(cfg), {"pixel_values": _px(64), "input_points": pts}


def vitdet():
    m = _make("VitDetConfig", "VitDetModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
              image_size=32, pretrain_image_size=32, patch_size=4, window_block_indices=[0], window_size=4,
              use_relative_position_embeddings=True, use_absolute_position_embeddings=True)
    return m, {"pixel_values": _px(32)}


def hiera():
    m = _make("HieraConfig", "HieraModel", embed_dim=8, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4],
              patch_padding=[3, 3], mlp_ratio=2.0, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
              embed_dim_multiplier=2.0, num_query_pool=2, query_stride=[2, 2], masked_unit_size=[8, 8],
              masked_unit_attention=[True, True, False, False])
    return m, {"pixel_values": _px(64)}


def _swin(config: str, model: str, **extra):
    return _make(config, model, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4, patch_size=4,
                 image_size=32, mlp_ratio=2.0, **extra), {"pixel_values": _px(32)}


def swinv2():
    return _swin("Swinv2Config", "Swinv2Model")


def donut_swin():
    return _swin("DonutSwinConfig", "DonutSwinModel")


def maskformer_swin():
    return _swin("MaskFormerSwinConfig", "MaskFormerSwinModel")


def pvt():
    m = _make("PvtConfig", "PvtModel", image_size=32, num_encoder_blocks=2, depths=[1, 1],
              sequence_reduction_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2],
              num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    return m, {"pixel_values": _px(32)}


def pvt_v2():
    m = _make("PvtV2Config", "PvtV2Model", image_size=32, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
              hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
              mlp_ratios=[2, 2])
    return m, {"pixel_values": _px(32)}


def mobilevit():
    m = _make("MobileViTConfig", "MobileViTModel", image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
              neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2, mlp_ratio=2.0,
              conv_kernel_size=3, output_stride=32)
    return m, {"pixel_values": _px(32)}


def levit():
    m = _make("LevitConfig", "LevitModel", image_size=32, patch_size=16, hidden_sizes=[32, 48], num_attention_heads=[2, 3],
              depths=[1, 1], key_dim=[8, 8], drop_path_rate=0, mlp_ratio=[2, 2], attention_ratio=[2, 2],
              down_ops=[["Subsample", 8, 2, 4, 2, 2]])
    return m, {"pixel_values": _px(32)}


def timesformer():
    m = _make("TimesformerConfig", "TimesformerModel", image_size=32, patch_size=8, num_frames=2, hidden_size=32,
              num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return m, {"pixel_values": _px(32, frames=2)}


def vivit():
    m = _make("VivitConfig", "VivitModel", image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=32,
              num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return m, {"pixel_values": _px(32, frames=4)}


def videomae():
    m = _make("VideoMAEConfig", "VideoMAEModel", image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
              hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return m, {"pixel_values": _px(32, frames=4)}


def yolos():
    m = _make("YolosConfig", "YolosModel", image_size=[32, 32], patch_size=8, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=64, num_detection_tokens=4)
    return m, {"pixel_values": _px(32)}


def data2vec_vision():
    m = _make("Data2VecVisionConfig", "Data2VecVisionModel", image_size=32, patch_size=8, hidden_size=32,
              num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, use_relative_position_bias=True)
    return m, {"pixel_values": _px(32)}


def dinov2_registers():
    m = _make("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", image_size=32, patch_size=8, hidden_size=32,
              num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, num_register_tokens=2)
    return m, {"pixel_values": _px(32)}


def perceiver():
    m = _make("PerceiverConfig", "PerceiverModel", impl=None, num_latents=8, d_latents=32, d_model=16, num_blocks=1,
              num_self_attends_per_block=1, num_self_attention_heads=2, num_cross_attention_heads=1)
    inputs = torch.randn(B, 12, 16, generator=torch.Generator().manual_seed(0))
    am = torch.ones(B, 12, dtype=torch.long)
    am[1, 8:] = 0
    return m, {"inputs": inputs, "attention_mask": am}


# ---- audio ------------------------------------------------------------------------------------

def whisper():
    import transformers

    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, encoder_layers=1, encoder_attention_heads=4,
                                     decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, d_model=64, max_source_positions=16,
                                     max_target_positions=32, pad_token_id=0, decoder_start_token_id=1,
                                     attn_implementation="eager")
    feats = torch.randn(B, 16, 32, generator=torch.Generator().manual_seed(0))
    dec = torch.randint(3, VOCAB, (B, 6), generator=torch.Generator().manual_seed(1))
    return transformers.WhisperModel(cfg), {"input_features": feats, "decoder_input_ids": dec}


def speech2text():
    import transformers

    cfg = transformers.Speech2TextConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64, max_source_positions=64, max_target_positions=32,
                                         num_conv_layers=1, conv_channels=16, input_feat_per_channel=8,
                                         conv_kernel_sizes=[5], use_cache=False, attn_implementation="eager")
    feats = torch.randn(B, 20, 8, generator=torch.Generator().manual_seed(0))
    am = torch.ones(B, 20, dtype=torch.long)
    am[1, 16:] = 0
    dec = torch.randint(3, VOCAB, (B, 6), generator=torch.Generator().manual_seed(1))
    return transformers.Speech2TextModel(cfg), {"input_features": feats, "attention_mask": am,
                                                "decoder_input_ids": dec}


def _audio(config: str, model: str, **extra):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2, vocab_size=32)
    m = _make(config, model, **{**base, **extra})
    return m, {"input_values": torch.randn(B, 1600, generator=torch.Generator().manual_seed(0))}


def ast():
    m = _make("ASTConfig", "ASTModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, patch_size=8, frequency_stride=8, time_stride=8, max_length=32, num_mel_bins=16)
    return m, {"input_values": torch.randn(B, 32, 16, generator=torch.Generator().manual_seed(0))}


# ---- more text ------------------------------------------------------------------------------

def musicgen_decoder():
    import transformers

    cfg = transformers.MusicgenDecoderConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, ffn_dim=128, num_codebooks=2,
                                             max_position_embeddings=64, use_cache=False, pad_token_id=0,
                                             bos_token_id=1, attn_implementation="eager")
    ids = torch.randint(3, VOCAB, (B * 2, 8), generator=torch.Generator().manual_seed(0))
    enc = torch.randn(B, 6, 64, generator=torch.Generator().manual_seed(1))
    am = torch.ones(B, 6, dtype=torch.long)
    am[1, 4:] = 0
    return transformers.MusicgenModel(cfg), {"input_ids": ids, "encoder_hidden_states": enc,
                                             "encoder_attention_mask": am}


WIDE: dict[str, Wide] = {
    "sam_vision": Wide(sam_vision, 2, _first(heads=1, mask="tensor"),
                       "block 0 in 4x4 windows, block 1 global; heads merged into the batch ([B*H, S, d], no "
                       "view splits them again: 1 head as the graph reads); the decomposed rel-pos term is "
                       "computed from q (einsum with learned tables), so it is an input-dependent additive tensor"),
    "sam": Wide(sam, 2 + 4, _first(heads=1, mask="tensor"),
                "vision encoder (2) + two-way mask decoder: token self, token->image, image->token, final "
                "token->image"),
    "vitdet": Wide(vitdet, 2, _first(heads=1, mask="tensor"),
                   "block 0 windowed (4x4 windows of the 8x8 grid), block 1 global; SAM's merged heads and "
                   "q-dependent decomposed rel-pos"),
    "hiera": Wide(hiera, 4, _first(heads=4),
                  "q/k/v are [B, heads, mask units, tokens, d]: the 4 mask units of stage 0 count as heads "
                  "(1 head x 4 units); query pooling in the first block of stages 1 and 2 (mask-unit attention "
                  "lags one stage), global attention in stage 3"),
    "swinv2": Wide(swinv2, 3, _first(heads=2, mods=("bias",)),
                   "cosine attention with a learned per-head logit scale; CPB-MLP bias; block 2 shifted"),
    "donut_swin": Wide(donut_swin, 3, _first(heads=2, mods=("bias",))),
    "maskformer_swin": Wide(maskformer_swin, 3, _first(heads=2, mods=("bias",))),
    "pvt": Wide(pvt, 2, _first(heads=1), "spatial-reduction attention: keys/values from a strided conv"),
    "pvt_v2": Wide(pvt_v2, 2, _first(heads=1)),
    "mobilevit": Wide(mobilevit, 9, _first(heads=2),
                      "2 + 4 + 3 transformer layers (fixed by the model); unfolded 2x2 patches: pixels of one "
                      "offset attend each other, patch offsets in the batch"),
    "levit": Wide(levit, 3, _first(heads=2, mods=("bias",)), "learned attention biases indexed by offsets"),
    "timesformer": Wide(timesformer, 2, _first(heads=2), "divided space-time: temporal then spatial attention"),
    "vivit": Wide(vivit, 2, _first(heads=2)),
    "videomae": Wide(videomae, 2, _first(heads=2)),
    "yolos": Wide(yolos, 2, _first(heads=2)),
    "data2vec_vision": Wide(data2vec_vision, 2, _first(heads=2, mods=("bias",))),
    "dinov2_registers": Wide(dinov2_registers, 2, _first(heads=2)),
    "perceiver": Wide(perceiver, 2, _first(heads=1, **PAD), "latents cross-attend the padded inputs, then self"),
    "whisper": Wide(whisper, 3, _first(),
                    "default use_cache=True (an EncoderDecoderCache is built in the forward); enc self, "
                    "dec causal self, cross"),
    "speech2text": Wide(speech2text, 3, _first(**PAD),
                        "the encoder's key padding is the frame mask subsampled by the conv stack (lengths via sum)"),
    "data2vec_audio": Wide(lambda: _audio("Data2VecAudioConfig", "Data2VecAudioModel", num_conv_pos_embeddings=5,
                                          conv_pos_kernel_size=5, num_conv_pos_embedding_groups=2), 2,
                           _first(heads=2)),
    "sew": Wide(lambda: _audio("SEWConfig", "SEWModel", squeeze_factor=2), 2, _first(heads=2)),
    "unispeech": Wide(lambda: _audio("UniSpeechConfig", "UniSpeechModel"), 2, _first(heads=2)),
    "wavlm": Wide(lambda: _audio("WavLMConfig", "WavLMModel", num_buckets=16, max_bucket_distance=32), 2,
                  _first(heads=1, mask="tensor"),
                  "F.multi_head_attention_forward merges the 2 heads into the batch (bmm on [B*H, S, d], 1 head as "
                  "the graph reads); the gated rel-pos bias is its attn_mask, gated by a sigmoid of the hidden "
                  "states (input-dependent: a 'tensor' mask, not a static bias); need_weights=True: the "
                  "head-averaged weights are computed and dropped (a dead view/mean/broadcast_to chain, which "
                  "made the weights look escaping before 6144c67)"),
    "ast": Wide(ast, 2, _first(heads=2)),
    "musicgen_decoder": Wide(musicgen_decoder, 2, _first(mask="causal"),
                             "causal self attention (no decoder mask given) + cross attention over padded encoder states"),
    # more decoder LLMs
    "qwen3_moe": Wide(lambda: text("Qwen3Moe", num_key_value_heads=2, head_dim=16, num_experts=2,
                                   num_experts_per_tok=1, moe_intermediate_size=32), 2,
                      _first(kv=2, **CAUSAL_PAD)),
    "olmo": Wide(lambda: text("Olmo", num_key_value_heads=2), 2, _first(kv=2, **CAUSAL_PAD)),
    "persimmon": Wide(lambda: text("Persimmon"), 2, _first(**CAUSAL_PAD), "partial rotary, qk layernorm"),
    "nemotron": Wide(lambda: text("Nemotron", num_key_value_heads=2, head_dim=16), 2, _first(kv=2, **CAUSAL_PAD)),
    "glm": Wide(lambda: text("Glm", num_key_value_heads=2, head_dim=16, pad_token_id=0), 2, _first(kv=2, **CAUSAL_PAD)),
    "helium": Wide(lambda: text("Helium", num_key_value_heads=2, head_dim=16), 2, _first(kv=2, **CAUSAL_PAD)),
}
NAMES = list(WIDE)
