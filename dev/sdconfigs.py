"""
SD1.5-, SDXL-, SD3.5- and FLUX.1-shaped model folders with random weights, built from config dicts (no
download): full size for a GPU smoke run of the real-model path, tiny for the CPU tests. The folders have the
layout of the real ones (unet/ or transformer/, vae/ text_encoder/ tokenizer/ scheduler/ [text_encoder_2/
tokenizer_2/] [text_encoder_3/ tokenizer_3/], model_index.json), with the real schedulers' configs (PNDM for
SD1.5, Euler for SDXL, flow matching for SD3.5 and FLUX), so load_model treats them as it treats real
local weights. The tokenizers are the toy world's word-level one (CLIP's BPE vocabulary
cannot be fetched here); the models only see token ids, so the compute is the real model's.

    python dev/sdconfigs.py --kind=sdxl --out=out/sdxl-random            # full size (SDXL: ~7 GB fp32)
    python dev/sdconfigs.py --kind=sd15 --tiny=True --out=out/sd15-tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python dev/sdconfigs.py

import torch  # noqa: E402

import models as M  # noqa: E402
import sample as S  # noqa: E402
import toyworld  # noqa: E402

# -----------------------------------------------------------------------------
kind = "sd15"            # sd15 | sdxl | sd3 (SD3.5-Medium's architecture) | flux (FLUX.1-dev's)
tiny = False             # tiny widths and depths (tests) instead of the real architecture
prediction = ""          # "" = the real model's (epsilon) | epsilon | v_prediction
out = ""
seed = 0
# -----------------------------------------------------------------------------

SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             steps_offset=1)


def text_config(hidden, layers, heads, max_len, projection, act="quick_gelu"):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_len,
                          projection_dim=projection, hidden_act=act, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def build(kind="sd15", tiny=True, prediction="", seed=0):
    """A random-init M.Pipe with the SD1.5, SDXL or SD3.5-Medium architecture (tiny: same block types, small
    widths). Its scheduler is the shipped PNDM / Euler / flow-matching one: sample from make()'s folder
    through load_model."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    if kind not in ("sd15", "sdxl", "sd3", "flux"):
        raise SystemExit(f"error: kind must be sd15, sdxl, sd3 or flux, got {kind!r}")
    torch.manual_seed(seed)
    if kind in ("sd3", "flux"):
        return (build_sd3 if kind == "sd3" else build_flux)(tiny)
    L = 12 if tiny else 77
    vae = AutoencoderKL(block_out_channels=(32, 32, 32) if tiny else (128, 256, 512, 512), layers_per_block=1 if tiny else 2,
                        down_block_types=("DownEncoderBlock2D",) * (3 if tiny else 4),
                        up_block_types=("UpDecoderBlock2D",) * (3 if tiny else 4), latent_channels=4,
                        sample_size=32 if tiny else (512 if kind == "sd15" else 1024),
                        scaling_factor=0.18215 if kind == "sd15" else 0.13025)
    if kind == "sd15":
        unet = UNet2DConditionModel(
            sample_size=8 if tiny else 64, block_out_channels=(32, 64) if tiny else (320, 640, 1280, 1280),
            layers_per_block=1 if tiny else 2, cross_attention_dim=32 if tiny else 768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if tiny else ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if tiny else ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        te = CLIPTextModel(text_config(*((32, 2, 2) if tiny else (768, 12, 12)), L, 32 if tiny else 768))
        sched = PNDMScheduler(**SCHED, skip_prk_steps=True, set_alpha_to_one=False,
                              prediction_type=prediction or "epsilon")
        sched.register_to_config(clip_sample=False)  # SD1.5's scheduler_config.json has it
        te2 = None
    else:
        unet = UNet2DConditionModel(
            sample_size=8 if tiny else 128, block_out_channels=(32, 64) if tiny else (320, 640, 1280),
            layers_per_block=1 if tiny else 2, cross_attention_dim=64 if tiny else 2048,
            transformer_layers_per_block=(1, 1) if tiny else (1, 2, 10), attention_head_dim=(2, 4) if tiny else (5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") + (() if tiny else ("CrossAttnDownBlock2D",)),
            up_block_types=(() if tiny else ("CrossAttnUpBlock2D",)) + ("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8 if tiny else 256,
            projection_class_embeddings_input_dim=6 * 8 + 32 if tiny else 6 * 256 + 1280)
        te = CLIPTextModel(text_config(*((32, 2, 2) if tiny else (768, 12, 12)), L, 32 if tiny else 768))
        te2 = CLIPTextModelWithProjection(text_config(*((32, 2, 2) if tiny else (1280, 32, 20)), L,
                                                      32 if tiny else 1280, "gelu"))
        sched = EulerDiscreteScheduler(**SCHED, timestep_spacing="leading", prediction_type=prediction or "epsilon")
        sched.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)  # as SDXL's file
    tok = toyworld.new_toy_tokenizer(L)
    # the scheduler as the real model ships it (PNDM / Euler); load_model turns it into DDIM
    return M.Pipe(unet, te.eval(), tok, sched, vae.eval(), te2.eval() if te2 else None, tok if te2 else None,
                  zero_uncond=kind == "sdxl")  # SDXL's model_index.json: force_zeros_for_empty_prompt


def t5_encoder(tiny):
    """T5-XXL's encoder (SD3's and FLUX's third / second text encoder), or a tiny one."""
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8) if tiny else T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new"))


def flow_vae(tiny, scaling_factor, shift_factor):
    """The 16-channel VAE of SD3 and FLUX (no quant convs, a shift), or a tiny 4-channel one."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(32, 32, 32) if tiny else (128, 256, 512, 512),
                         layers_per_block=1 if tiny else 2, down_block_types=("DownEncoderBlock2D",) * (3 if tiny else 4),
                         up_block_types=("UpDecoderBlock2D",) * (3 if tiny else 4), latent_channels=4 if tiny else 16,
                         sample_size=32 if tiny else 1024, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_sd3(tiny=True):
    """SD3.5-Medium's architecture (MMDiT-X: 24 joint blocks, 13 with dual attention, qk RMS norm; CLIP-L, CLIP-G
    and T5-XXL; a 16-channel VAE with shift; flow matching with shift 3), or a tiny one for tests."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection
    L = 12 if tiny else 77
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm") if tiny else SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    te = CLIPTextModelWithProjection(text_config(*((32, 2, 2) if tiny else (768, 12, 12)), L, 32 if tiny else 768))
    te2 = CLIPTextModelWithProjection(text_config(*((32, 2, 2) if tiny else (1280, 32, 20)), L,
                                                  32 if tiny else 1280, "gelu"))
    te3 = t5_encoder(tiny)
    vae = flow_vae(tiny, scaling_factor=1.5305, shift_factor=0.0609)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    tok = toyworld.new_toy_tokenizer(L)
    return M.Pipe(transformer, te.eval(), tok, sched, vae.eval(), te2.eval(), tok,
                  text_encoder_3=te3.eval(), tokenizer_3=tok)


def build_flux(tiny=True):
    """FLUX.1-dev's architecture (19 double and 38 single stream blocks, guidance embedding; CLIP-L pooled and
    T5-XXL; a 16-channel VAE with shift; flow matching with dynamic shift), or a tiny one for tests (its
    pipeline samples the tiny one at 32 px: --resolution=32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel
    L = 12 if tiny else 77
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8)) if tiny else FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    te = CLIPTextModel(text_config(*((32, 2, 2) if tiny else (768, 12, 12)), L, 32 if tiny else 768))
    te2 = t5_encoder(tiny)
    vae = flow_vae(tiny, scaling_factor=0.3611, shift_factor=0.1159)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    tok = toyworld.new_toy_tokenizer(L)
    return M.Pipe(transformer, te.eval(), tok, sched, vae.eval(), te2.eval(), tok)


def make(folder, kind="sd15", tiny=True, prediction="", seed=0):
    """build(...) written to `folder` as a diffusers-style folder; returns the folder."""
    M.save_model(build(kind, tiny, prediction, seed), folder)
    return folder


if __name__ == "__main__":
    S.configure(globals(), sys.argv[1:])
    out = out or f"out/{kind}-random{'-tiny' if tiny else ''}"
    pipe = build(kind, tiny, prediction, seed)
    n = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) / 1e6
         for k in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, k) is not None}
    M.save_model(pipe, out)
    print(f"wrote a random-init {kind}{' (tiny)' if tiny else ''} folder to {out}: "
          + ", ".join(f"{k} {v:.1f}M" for k, v in n.items()))
