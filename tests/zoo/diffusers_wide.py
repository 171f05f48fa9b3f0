"""diffusers transformers (and the SD UNet / VAE attention) from tiny configs, random sharpened
weights, CPU: does attnopt find the attention of diffusion models written by other hands?

Same entry type as zoo.hf_wide (`Wide(build, sites, first, notes)`); `sites` and `first` come
from reading each model's code (diffusers 0.42). Builders return (model, kwargs); models keep
diffusers' default `return_dict=True` (a dataclass output) unless `notes` says otherwise.
Inputs are deterministic (one generator per builder). Batch 2, a handful of latent tokens and
text tokens, heads 2-4, head dims 8-16, 1-2 layers of each kind.
"""
from __future__ import annotations

import torch

from zoo.hf_wide import Wide, _first

B = 2


def _rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _t() -> torch.Tensor:
    return torch.tensor([10.0, 500.0])


def _text_mask(n: int, pad: int = 3, dtype=torch.long) -> torch.Tensor:
    """[B, n] keep-mask: row 1's last `pad` text tokens are padding."""
    m = torch.ones(B, n, dtype=dtype)
    m[1, n - pad:] = 0
    return m


def _ids(h: int, w: int) -> torch.Tensor:
    """Flux-style image position ids [(h*w), 3]: (0, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _d(name: str):
    import diffusers

    return getattr(diffusers, name)


# ---- MMDiT / Flux family -------------------------------------------------------------------

def flux():
    m = _d("FluxTransformer2DModel")(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    kw = dict(hidden_states=_rand(B, 16, 4), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              pooled_projections=_rand(B, 32, seed=2), timestep=torch.tensor([0.1, 0.9]),
              img_ids=_ids(4, 4), txt_ids=torch.zeros(8, 3))
    return m, kw


def flux_guidance():
    m = _d("FluxTransformer2DModel")(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True)
    _, kw = flux()
    return m, {**kw, "guidance": torch.tensor([3.5, 3.5])}


def flux2():
    m = _d("Flux2Transformer2DModel")(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                      timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
    kw = dict(hidden_states=_rand(B, 16, 4), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([0.1, 0.9]), img_ids=torch.cat([torch.zeros(16, 1), _ids(4, 4)], 1),
              txt_ids=torch.zeros(8, 4), guidance=torch.tensor([3.5, 3.5]))
    return m, kw


def chroma():
    m = _d("ChromaTransformer2DModel")(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                       axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                                       approximator_hidden_dim=32, approximator_layers=1)
    kw = dict(hidden_states=_rand(B, 16, 4), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([0.1, 0.9]), img_ids=_ids(4, 4), txt_ids=torch.zeros(8, 3))
    return m, kw


def bria():
    m = _d("BriaTransformer2DModel")(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                     axes_dims_rope=[4, 6, 6])
    kw = dict(hidden_states=_rand(B, 16, 4), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([0.1, 0.9]), img_ids=_ids(4, 4), txt_ids=torch.zeros(8, 3))
    return m, kw


def ovis_image():
    m = _d("OvisImageTransformer2DModel")(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                          num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                                          joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    kw = dict(hidden_states=_rand(B, 16, 4), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([0.1, 0.9]), img_ids=_ids(4, 4), txt_ids=torch.zeros(8, 3))
    return m, kw


def longcat_image():
    m = _d("LongCatImageTransformer2DModel")(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    kw = dict(hidden_states=_rand(B, 16, 4), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([0.1, 0.9]), img_ids=_ids(4, 4), txt_ids=torch.zeros(8, 3))
    return m, kw


def sd3(dual: bool = False):
    m = _d("SD3Transformer2DModel")(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                                    pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                                    dual_attention_layers=(0,) if dual else (),
                                    qk_norm="rms_norm" if dual else None)
    kw = dict(hidden_states=_rand(B, 4, 8, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              pooled_projections=_rand(B, 32, seed=2), timestep=_t())
    return m, kw


def auraflow():
    m = _d("AuraFlowTransformer2DModel")(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                         num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=4,
                                         joint_attention_dim=32, caption_projection_dim=64, out_channels=4,
                                         pos_embed_max_size=64)
    kw = dict(hidden_states=_rand(B, 4, 8, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1), timestep=_t())
    return m, kw


def _cogview_inputs() -> dict:
    """CogView 3 Plus and 4 take the same inputs: latents, text, timestep, SDXL-style size conditions."""
    sizes = torch.tensor([[64.0, 64.0]] * B)
    return dict(hidden_states=_rand(B, 4, 8, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1), timestep=_t(),
                original_size=sizes, target_size=sizes, crop_coords=torch.zeros(B, 2))


def cogview3plus():
    m = _d("CogView3PlusTransformer2DModel")(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                             num_attention_heads=4, out_channels=4, text_embed_dim=32,
                                             time_embed_dim=16, condition_dim=4, pos_embed_max_size=8,
                                             sample_size=8)
    return m, _cogview_inputs()


def cogview4():
    m = _d("CogView4Transformer2DModel")(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                         num_attention_heads=4, out_channels=4, text_embed_dim=32,
                                         time_embed_dim=16, condition_dim=4, rope_axes_dim=(8, 8))
    return m, _cogview_inputs()


def qwenimage():
    m = _d("QwenImageTransformer2DModel")(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                          attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                          axes_dims_rope=(8, 4, 4))
    kw = dict(hidden_states=_rand(B, 16, 16), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              encoder_hidden_states_mask=_text_mask(8), timestep=torch.tensor([0.1, 0.9]),
              img_shapes=[[(1, 4, 4)]] * B)
    return m, kw


def hidream():
    m = _d("HiDreamImageTransformer2DModel")(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                             num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
                                             caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
                                             num_activated_experts=2, axes_dims_rope=(2, 2, 4), max_resolution=(32, 32),
                                             llama_layers=(0, 1))
    kw = dict(hidden_states=_rand(B, 4, 8, 8), timesteps=_t(), encoder_hidden_states_t5=_rand(B, 8, 16, seed=1),
              encoder_hidden_states_llama3=_rand(2, B, 8, 8, seed=2), pooled_embeds=_rand(B, 16, seed=3))
    return m, kw


# ---- DiT / PixArt family (diffusers' BasicTransformerBlock + Attention) ------------------------

def dit():
    m = _d("DiTTransformer2DModel")(num_attention_heads=4, attention_head_dim=16, in_channels=4, num_layers=2,
                                    sample_size=8, patch_size=2, norm_num_groups=4)
    kw = dict(hidden_states=_rand(B, 4, 8, 8), timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 7]))
    return m, kw


def pixart():
    m = _d("PixArtTransformer2DModel")(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                       num_layers=1, cross_attention_dim=64, sample_size=8, patch_size=2,
                                       caption_channels=32, use_additional_conditions=False, norm_num_groups=4)
    kw = dict(hidden_states=_rand(B, 4, 8, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([10, 500]), encoder_attention_mask=_text_mask(8))
    return m, kw


def sana():
    m = _d("SanaTransformer2DModel")(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                     num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                     cross_attention_dim=32, caption_channels=16, sample_size=8, patch_size=1)
    kw = dict(hidden_states=_rand(B, 4, 8, 8), encoder_hidden_states=_rand(B, 8, 16, seed=1), timestep=_t(),
              encoder_attention_mask=_text_mask(8))
    return m, kw


def hunyuan_dit():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    m = _d("HunyuanDiT2DModel")(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, hidden_size=32, cross_attention_dim=16,
                                cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=4, text_len_t5=4,
                                activation_fn="gelu-approximate")
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    kw = dict(hidden_states=_rand(B, 4, 8, 8), timestep=_t(), encoder_hidden_states=_rand(B, 4, 16, seed=1),
              text_embedding_mask=_text_mask(4, 1), encoder_hidden_states_t5=_rand(B, 4, 16, seed=2),
              text_embedding_mask_t5=_text_mask(4, 1), image_meta_size=torch.tensor([[64.0] * 6] * B),
              style=torch.zeros(B, dtype=torch.long), image_rotary_emb=rope)
    return m, kw


def lumina2():
    m = _d("Lumina2Transformer2DModel")(sample_size=8, patch_size=2, in_channels=4, hidden_size=48, num_layers=1,
                                        num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=16,
                                        axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), cap_feat_dim=16)
    kw = dict(hidden_states=_rand(B, 4, 8, 8), timestep=torch.tensor([0.1, 0.9]),
              encoder_hidden_states=_rand(B, 8, 16, seed=1), encoder_attention_mask=_text_mask(8, dtype=torch.bool))
    return m, kw


def stable_audio():
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    m = _d("StableAudioDiTModel")(sample_size=16, in_channels=4, num_layers=1, attention_head_dim=16,
                                  num_attention_heads=4, num_key_value_attention_heads=2, out_channels=4,
                                  cross_attention_dim=16, time_proj_dim=8, global_states_input_dim=16,
                                  cross_attention_input_dim=16)
    rope = get_1d_rotary_pos_embed(8, 16 + 1, use_real=True, repeat_interleave_real=False)
    kw = dict(hidden_states=_rand(B, 4, 16), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=_rand(B, 8, 16, seed=1), global_hidden_states=_rand(B, 1, 16, seed=2),
              rotary_embedding=rope)
    return m, kw


# ---- video ------------------------------------------------------------------------------------

def wan(cls: str = "WanTransformer3DModel", **extra):
    m = _d(cls)(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra)
    kw = dict(hidden_states=_rand(B, 4, 2, 8, 8), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=_rand(B, 8, 32, seed=1))
    return m, kw


def wan_i2v():
    # WanAttnProcessor splits the image tokens off as everything before the last 512 (text) tokens
    m, kw = wan(image_dim=16, added_kv_proj_dim=64)
    return m, {**kw, "encoder_hidden_states": _rand(B, 512, 32, seed=1),
               "encoder_hidden_states_image": _rand(B, 4, 16, seed=2)}


def hunyuan_video():
    m = _d("HunyuanVideoTransformer3DModel")(in_channels=4, out_channels=4, num_attention_heads=4,
                                             attention_head_dim=16, num_layers=1, num_single_layers=1,
                                             num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                             guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
                                             rope_axes_dim=(4, 6, 6))
    kw = dict(hidden_states=_rand(B, 4, 1, 8, 8), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=_rand(B, 8, 32, seed=1), encoder_attention_mask=_text_mask(8),
              pooled_projections=_rand(B, 16, seed=2), guidance=torch.tensor([3.5, 3.5]))
    return m, kw


def cogvideox():
    m = _d("CogVideoXTransformer3DModel")(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                          out_channels=4, time_embed_dim=16, text_embed_dim=32, num_layers=1,
                                          sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                          temporal_compression_ratio=4, max_text_seq_length=8)
    kw = dict(hidden_states=_rand(B, 2, 4, 8, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([10, 500]))
    return m, kw


def ltx_video():
    m = _d("LTXVideoTransformer3DModel")(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                         num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64,
                                         num_layers=1, caption_channels=32)
    kw = dict(hidden_states=_rand(B, 2 * 4 * 4, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([10, 500]), encoder_attention_mask=_text_mask(8),
              num_frames=2, height=4, width=4)
    return m, kw


def mochi():
    m = _d("MochiTransformer3DModel")(patch_size=2, num_attention_heads=4, attention_head_dim=16, num_layers=1,
                                      pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=8,
                                      max_sequence_length=8)
    kw = dict(hidden_states=_rand(B, 4, 2, 8, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([10, 500]), encoder_attention_mask=_text_mask(8))
    return m, kw


def allegro():
    m = _d("AllegroTransformer3DModel")(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                                        num_layers=1, cross_attention_dim=64, sample_width=8, sample_height=8,
                                        sample_frames=8, caption_channels=32)
    kw = dict(hidden_states=_rand(B, 4, 2, 8, 8), encoder_hidden_states=_rand(B, 8, 32, seed=1),
              timestep=torch.tensor([10, 500]))
    return m, kw


def latte():
    m = _d("LatteTransformer3DModel")(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=16,
                                      num_attention_heads=4, caption_channels=32, in_channels=4, cross_attention_dim=64,
                                      out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                      num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                      norm_elementwise_affine=False, norm_eps=1e-6, video_length=2)
    kw = dict(hidden_states=_rand(B, 4, 2, 8, 8), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=_rand(B, 8, 32, seed=1))
    return m, kw


def cosmos():
    m = _d("CosmosTransformer3DModel")(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16,
                                       num_layers=1, mlp_ratio=2, text_embed_dim=32, adaln_lora_dim=4,
                                       max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                       concat_padding_mask=False, extra_pos_embed_type="learnable")
    kw = dict(hidden_states=_rand(B, 4, 1, 8, 8), timestep=torch.tensor([10.0, 500.0]),
              encoder_hidden_states=_rand(B, 8, 32, seed=1))
    return m, kw


def easyanimate():
    m = _d("EasyAnimateTransformer3DModel")(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                            out_channels=4, time_embed_dim=16, text_embed_dim=32, num_layers=1,
                                            mmdit_layers=1, sample_width=8, sample_height=8, patch_size=2)
    kw = dict(hidden_states=_rand(B, 4, 2, 8, 8), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=_rand(B, 8, 32, seed=1))
    return m, kw


# ---- UNet-era ------------------------------------------------------------------------------

def sd_unet():
    m = _d("UNet2DConditionModel")(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                   out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                   attention_head_dim=8, norm_num_groups=8)
    kw = dict(sample=_rand(B, 4, 8, 8), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=_rand(B, 8, 32, seed=1))
    return m, kw


def transformer2d():
    m = _d("Transformer2DModel")(num_attention_heads=4, attention_head_dim=8, in_channels=32, num_layers=1,
                                 cross_attention_dim=32, norm_num_groups=8)
    kw = dict(hidden_states=_rand(B, 32, 4, 4), encoder_hidden_states=_rand(B, 8, 32, seed=1))
    return m, kw


def vae_kl():
    m = _d("AutoencoderKL")(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                            latent_channels=4, norm_num_groups=8, sample_size=16)
    kw = dict(sample=_rand(B, 3, 16, 16), sample_posterior=False)
    return m, kw


def prior():
    m = _d("PriorTransformer")(num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=32,
                               num_embeddings=8, additional_embeddings=4)
    kw = dict(hidden_states=_rand(B, 32), timestep=torch.tensor([10, 500]), proj_embedding=_rand(B, 32, seed=1),
              encoder_hidden_states=_rand(B, 8, 32, seed=2), attention_mask=_text_mask(8, dtype=torch.bool))
    return m, kw


PAD = dict(mask="padding", padding=True)

WIDE: dict[str, Wide] = {
    "flux": Wide(flux, 2, _first(),
                 "one joint block (image+text concatenated, one SDPA) and one single block; rope on q/k"),
    "flux_guidance": Wide(flux_guidance, 2, _first()),
    "flux2": Wide(flux2, 2, _first(), "Flux.2: parallel single block, 4-axis rope"),
    "chroma": Wide(chroma, 2, _first()),
    "bria": Wide(bria, 2, _first()),
    "ovis_image": Wide(ovis_image, 2, _first()),
    "longcat_image": Wide(longcat_image, 2, _first()),
    "sd3": Wide(sd3, 2, _first(), "two joint blocks; the last is context_pre_only"),
    "sd35": Wide(lambda: sd3(dual=True), 3, _first(), "dual attention (an extra image-only attn2) and qk rms norm"),
    "auraflow": Wide(auraflow, 2, _first()),
    "cogview3plus": Wide(cogview3plus, 1, _first()),
    "cogview4": Wide(cogview4, 1, _first()),
    "qwenimage": Wide(qwenimage, 1, _first(**PAD),
                      "joint attention; [B, 1, 1, text+image] bool key mask = cat(text mask, ones)"),
    "hidream": Wide(hidream, 2, _first(),
                    "the MoE's inference path calls .numpy() on a tensor: torch.export cannot trace it"),
    "dit": Wide(dit, 2, _first()),
    "pixart": Wide(pixart, 2, _first(), "self + cross per block; the cross attention's text keys are padded"),
    "sana": Wide(sana, 1, _first(heads=2, **PAD),
                 "self attention is ReLU linear attention (no softmax: not a site); cross attention with padding"),
    "hunyuan_dit": Wide(hunyuan_dit, 5, _first(heads=8),
                        "the T5 text pool (HunyuanDiTAttentionPool: F.multi_head_attention_forward, one query, "
                        "8 heads), then self (rope) + cross per block; text masks swap padded tokens, no attention mask"),
    "lumina2": Wide(lumina2, 3, _first(heads=3, kv=1, **PAD),
                    "len(set(seq_lengths)) over the mask's row sums: data-dependent, torch.export cannot trace it"),
    "stable_audio": Wide(stable_audio, 2, _first(),
                         "self attention (partial rope, the global token prepended) + GQA cross attention (4 q / 2 kv heads)"),
    "wan": Wide(wan, 2, _first(), "self + cross per block"),
    "wan_i2v": Wide(wan_i2v, 3, _first(), "self + text cross + image cross (added k/v projections)"),
    "skyreels_v2": Wide(lambda: wan("SkyReelsV2Transformer3DModel"), 2, _first()),
    "chronoedit": Wide(lambda: wan("ChronoEditTransformer3DModel"), 2, _first()),
    "hunyuan_video": Wide(hunyuan_video, 3, _first(mask="tensor"),
                          "token refiner (query x key padding: a tensor mask), one dual-stream and one single-stream "
                          "block (key padding over [latents, text] from the text mask's length)"),
    "cogvideox": Wide(cogvideox, 1, _first()),
    "ltx_video": Wide(ltx_video, 2, _first(), "self + cross (text padding) per block; int kwargs num_frames/height/width"),
    "mochi": Wide(mochi, 3, _first(heads=8, **PAD),
                  "the text pool (one query over [pooled, text], key padding F.pad-ed by one kept key), then the "
                  "joint attention once per batch row over that row's valid tokens (data-dependent lengths)"),
    "allegro": Wide(allegro, 2, _first()),
    "latte": Wide(latte, 3, _first(), "spatial self + cross, temporal self"),
    "cosmos": Wide(cosmos, 2, _first()),
    "easyanimate": Wide(easyanimate, 1, _first()),
    "sd_unet": Wide(sd_unet, 8, _first(heads=8),
                    "UNet2DConditionModel: attention_head_dim is the head count; down (1), mid (1), up (2) "
                    "transformer blocks, self + cross each"),
    "transformer2d": Wide(transformer2d, 2, _first()),
    "vae_kl": Wide(vae_kl, 2, _first(heads=1), "one single-head attention in the encoder's and the decoder's mid block"),
    "prior": Wide(prior, 1, _first(heads=2, mask="causal", padding=True),
                  "-10000 causal mask + key padding (the input mask F.pad-ed over the 4 extra embeddings)"),
}
NAMES = list(WIDE)
