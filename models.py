"""
The model families: load a diffusers-style folder (SD1.x, SDXL, SD3, FLUX, and the built-in toy models) into one Pipe,
save one back as a diffusers pipeline folder, encode prompts, call the denoiser, and move images in and out of the
model's space. Checks on a folder that need no loading (its family, whether it is a flow model, the image sizes it
takes) read its config files alone. sample.py (the sampler) and everything above it use these.
"""
import json
import os
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy-model")


# -----------------------------------------------------------------------------
# a diffusers-style folder

@dataclass
class Pipe:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object          # DDIMScheduler: alphas_cumprod, prediction_type, timestep spacing
    vae: object = None         # None: the UNet works in image space, [-1, 1]
    text_encoder_2: object = None  # SDXL: CLIPTextModelWithProjection (penultimate states + pooled)
    tokenizer_2: object = None
    zero_uncond: bool = False  # CFG's unconditional input is zeros, not the encoded "" (SDXL's pipeline default)
    text_encoder_3: object = None  # SD3: T5EncoderModel (its sequence after both CLIPs'); `unet` holds the transformer
    tokenizer_3: object = None     # (FLUX: text_encoder is CLIP for the pooled vector, text_encoder_2 is T5)
    resolution: int = 0            # image side in pixels; 0: the model's own (its sample_size; FLUX: 1024)
    embedded_guidance: float = 3.5  # FLUX-dev's guidance input where a call is not given one (its pipeline's default)
    compute_device: object = None   # set where the unet's weights are not where its passes run (fsdp's CPU offload)

    @property
    def device(self):  # where the passes run (--cpu_offload keeps the sharded weights in CPU memory)
        return self.compute_device or next(self.unet.parameters()).device

    @property
    def family(self):  # sd | sdxl | sd3 | flux: how prompts are encoded and the denoiser is called
        return family_of(self.unet_class, self.text_encoder_2 is not None)

    @property
    def denoiser(self):  # the folder (and model_index) name of what `unet` holds
        return "unet" if self.unet_class == "UNet2DConditionModel" else "transformer"

    @property
    def unet_class(self):  # (fully_shard renames the class FSDP<name>)
        return type(self.unet).__name__.removeprefix("FSDP")

    @property
    def vae_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 1

    @property
    def image_size(self):  # pixels per side of its images: latent size x the VAE's downsampling
        return self.resolution or (1024 if self.family == "flux" else self.unet.config.sample_size * self.vae_factor)

    @property
    def patch(self):  # latent pixels per side of one transformer token (FLUX packs 2x2; a UNet: 1)
        return 2 if self.family == "flux" else getattr(self.unet.config, "patch_size", 1)

    @property
    def latent_shape(self):  # (C, H, W) of the sampler's state (FLUX: unpacked; its transformer sees 2x2 patches)
        C = self.unet.config.in_channels // (4 if self.family == "flux" else 1)
        return (C, self.image_size // self.vae_factor, self.image_size // self.vae_factor)


TRANSFORMERS = {"SD3Transformer2DModel": ("sd3", "text_encoder_3"),  # supported transformer -> (family, the
                "FluxTransformer2DModel": ("flux", "text_encoder_2")}  # T5 folder it needs)


def family_of(denoiser_class, has_second_encoder):
    return TRANSFORMERS[denoiser_class][0] if denoiser_class in TRANSFORMERS else \
        ("sdxl" if has_second_encoder else "sd")


def check_model_folder(folder, resolution=0):
    """Fail with one line unless `folder` has the subfolders load_model reads and takes `resolution` (check_resolution).
    Reads config files only: the scripts call it before any model loads."""
    has = lambda d: os.path.isdir(os.path.join(folder, d))
    missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler") if not has(d)
               and not (d == "unet" and has("transformer"))]
    if missing:
        raise SystemExit(f"error: model folder {folder!r} lacks {', '.join(m + '/' for m in missing)} "
                         "(expected a diffusers-style folder: unet/ text_encoder/ tokenizer/ scheduler/ [vae/])")
    check_resolution(folder, resolution)


def load_model(folder, device="cpu", dtype=torch.float32, uncond="auto", resolution=0):
    """A local folder's unet/ text_encoder/ tokenizer/ scheduler/ [vae/: latent space] [text_encoder_2/ tokenizer_2/:
    SDXL] (SD3: transformer/ instead of unet/, and text_encoder_3/ tokenizer_3/, T5; FLUX: transformer/, CLIP and
    T5 as text_encoder/ text_encoder_2/), in `dtype`, frozen; resolution: the image side (0: the model's).
    Any scheduler (PNDM, Euler, DDIM) lends our DDIM its config: schedule, spacing,
    offset, set_alpha_to_one, clip_sample, prediction type. uncond: CFG's unconditional input, "zeros" or "empty"
    (the encoded ""); "auto" follows model_index.json's force_zeros_for_empty_prompt, else the pipeline's default
    (zeros for SDXL, the encoded "" for SD)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel
    import diffusers
    _quiet()
    check_model_folder(folder, resolution)
    sub, has = (lambda d: os.path.join(folder, d)), (lambda d: os.path.isdir(os.path.join(folder, d)))
    if has("unet"):
        unet = _load(UNet2DConditionModel, sub("unet"), torch_dtype=dtype)
    else:  # a diffusion transformer, by the class its config names
        name = _load(UNet2DConditionModel, sub("transformer"), config=True).get("_class_name", "")
        if name not in TRANSFORMERS or not has(TRANSFORMERS[name][1]):
            raise SystemExit(f"error: {sub('transformer')} is a {name or 'transformer without _class_name'}; "
                             "supported: SD3Transformer2DModel with text_encoder_3/ (SD3, SD3.5), "
                             "FluxTransformer2DModel with text_encoder_2/ (FLUX.1)")
        unet = _load(getattr(diffusers, name), sub("transformer"), torch_dtype=dtype)
    if getattr(unet.config, "addition_embed_type", None) == "text_time" and not (has("text_encoder_2") and has("tokenizer_2")):
        raise SystemExit(f"error: {sub('unet')} is an SDXL UNet (addition_embed_type text_time) but "
                         f"{folder!r} lacks text_encoder_2/ or tokenizer_2/")
    sched = _load(DDIMScheduler, sub("scheduler"), config=True)  # SD/SDXL ship PNDM/Euler configs: no clip_sample there
    if is_flow_config(sched):  # flow matching (SD3, FLUX, the flow toy model)
        from diffusers import FlowMatchEulerDiscreteScheduler
        sched = FlowMatchEulerDiscreteScheduler.from_config(sched)
    else:
        sched = DDIMScheduler.from_config(sched, **({} if "clip_sample" in sched else {"clip_sample": False}))
    if getattr(sched.config, "thresholding", False):
        raise SystemExit(f"error: {sub('scheduler')} sets thresholding (dynamic thresholding is not supported)")
    if uncond not in ("auto", "zeros", "empty"):
        raise SystemExit(f"error: uncond must be 'auto', 'zeros' or 'empty', got {uncond!r}")
    family = family_of(type(unet).__name__, has("text_encoder_2"))
    sd3, flux = family == "sd3", family == "flux"  # SD3's CLIPs both project; FLUX's second encoder is T5
    pipe = Pipe(unet=unet, text_encoder=_load(CLIPTextModelWithProjection if sd3 else CLIPTextModel,
                                              sub("text_encoder"), dtype=dtype),
                tokenizer=_load(AutoTokenizer, sub("tokenizer")), scheduler=sched,
                vae=_load(AutoencoderKL, sub("vae"), torch_dtype=dtype) if has("vae") else None)
    if has("text_encoder_2"):
        pipe.text_encoder_2 = _load(T5EncoderModel if flux else CLIPTextModelWithProjection, sub("text_encoder_2"),
                                    dtype=dtype)
        pipe.tokenizer_2 = _load(AutoTokenizer, sub("tokenizer_2"))
    if sd3:
        pipe.text_encoder_3 = _load(T5EncoderModel, sub("text_encoder_3"), dtype=dtype)
        pipe.tokenizer_3 = _load(AutoTokenizer, sub("tokenizer_3"))
    index = os.path.join(folder, "model_index.json")
    index = json.load(open(index)) if os.path.isfile(index) else {}
    pipe.zero_uncond = uncond == "zeros" or (uncond == "auto" and index.get(
        "force_zeros_for_empty_prompt", pipe.family == "sdxl"))
    pipe.resolution = resolution
    for m in (pipe.unet, pipe.text_encoder, pipe.vae, pipe.text_encoder_2, pipe.text_encoder_3):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return pipe


def _load(cls, path, config=False, **kw):
    """cls.from_pretrained(path) (or load_config), with a broken folder as one line naming it."""
    try:
        return cls.load_config(path) if config else cls.from_pretrained(path, **kw)
    except Exception as e:  # json, safetensors, shape and missing-file errors from deep in the libraries
        msg = str(e).strip().splitlines()
        raise SystemExit(f"error: cannot load {path} ({type(e).__name__}: {msg[0][:200] if msg else ''})") from None


def _quiet():  # diffusers/transformers chatter (accelerate hints, shard progress bars) hides our output
    import diffusers, transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" of DiffusionPipeline
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae", "text_encoder_2", "tokenizer_2", "text_encoder_3",
              "tokenizer_3")


def save_model(pipe, folder, lora=None):
    """The pipe as a diffusers-style folder that load_model reads back bit-exactly, every component copied in,
    and with a VAE a complete diffusers pipeline (model_index.json: StableDiffusion[XL|3]Pipeline or FluxPipeline,
    its scheduler, SDXL's uncond convention). The pixel-space toy model gets none: it has no VAE for a diffusers
    pipeline to decode with.
    lora: {name: tensor}, written as pytorch_lora_weights.safetensors (lora.diffusers_state_dict).
    Written beside the target and renamed into place: a crash never leaves a half-written folder."""
    import shutil
    import diffusers
    _quiet()
    folder = os.path.abspath(folder)
    tmp, old = f"{folder}.tmp{os.getpid()}", f"{folder}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    family = pipe.family
    kind = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
            "flux": "FluxPipeline"}[family]
    index = {"_class_name": kind, "_diffusers_version": diffusers.__version__, "feature_extractor": [None, None]}
    index.update({"sd": {"safety_checker": [None, None], "requires_safety_checker": False},
                  "sdxl": {"force_zeros_for_empty_prompt": pipe.zero_uncond, "image_encoder": [None, None]}}.get(
        family, {"image_encoder": [None, None]}))
    for name in COMPONENTS:
        if getattr(pipe, name) is not None:
            where = pipe.denoiser if name == "unet" else name
            getattr(pipe, name).save_pretrained(os.path.join(tmp, where))
            cls = type(getattr(pipe, name))
            index[where] = [cls.__module__.split(".")[0], cls.__name__]
    if pipe.vae is not None:
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(dict(sorted(index.items())), f, indent=2)
    if lora:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in lora.items()}, os.path.join(tmp, "pytorch_lora_weights.safetensors"),
                  metadata={"format": "pt"})
    if os.path.exists(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


T5_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines pad T5 prompts to max_sequence_length


def tokenize(pipe, prompts, tokenizer=None, length=None):
    """prompts (list of B str) -> token ids (B, L), padded to `length` or the tokenizer's max length."""
    tok = tokenizer or pipe.tokenizer
    return tok(list(prompts), padding="max_length", truncation=True, max_length=length or tok.model_max_length,
               return_tensors="pt").input_ids


@torch.no_grad()
def encode(pipe, prompts):
    """prompts (list of B str) -> cond (B, L, E), one tensor for any model. SD: the text encoder's last
    hidden state. SDXL (as diffusers' pipeline): both encoders' penultimate states side by side, plus a row
    with encoder 2's pooled projection, zero-padded: (B, L+1, E1+E2). SD3 (as its pipeline): both CLIPs'
    penultimate states side by side, zero-padded to T5's width, then T5's states, then a row with both pooled
    projections: (B, L + 256 + 1, E_t5). FLUX: T5's states, then CLIP's pooled output: (B, 512 + 1, E_t5).
    unet_call unpacks it."""
    F = torch.nn.functional
    ids = tokenize(pipe, prompts).to(pipe.device)
    if pipe.family == "flux":  # T5's states, then a row with CLIP's pooled output
        t5 = pipe.text_encoder_2(tokenize(pipe, prompts, pipe.tokenizer_2, T5_LENGTH["flux"]).to(pipe.device))[0]
        pooled = pipe.text_encoder(ids).pooler_output.to(t5.dtype)
        return torch.cat([t5, F.pad(pooled, (0, t5.shape[-1] - pooled.shape[-1]))[:, None]], 1)
    if pipe.family == "sd3":
        outs = [te(tokenize(pipe, prompts, tok).to(pipe.device), output_hidden_states=True)
                for te, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))]
        t5 = pipe.text_encoder_3(tokenize(pipe, prompts, pipe.tokenizer_3, T5_LENGTH["sd3"]).to(pipe.device))[0]
        clip = torch.cat([o.hidden_states[-2].to(t5.dtype) for o in outs], -1)
        h = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], 1)
        pooled = torch.cat([o.text_embeds.to(t5.dtype) for o in outs], -1)
        return torch.cat([h, F.pad(pooled, (0, h.shape[-1] - pooled.shape[-1]))[:, None]], 1)
    if pipe.family == "sd":
        return pipe.text_encoder(ids)[0]
    h1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out = pipe.text_encoder_2(tokenize(pipe, prompts, pipe.tokenizer_2).to(pipe.device), output_hidden_states=True)
    h = torch.cat([h1, out.hidden_states[-2].to(h1.dtype)], -1)
    pooled = torch.nn.functional.pad(out.text_embeds.to(h.dtype), (0, h.shape[-1] - out.text_embeds.shape[-1]))
    return torch.cat([h, pooled[:, None]], 1)


def uncond(pipe):
    """CFG's unconditional input (1, L, E): the encoded "" or, where the pipeline zeroes it (SDXL), zeros."""
    u = encode(pipe, [""])
    return torch.zeros_like(u) if pipe.zero_uncond else u


def unet_call(pipe, unet, x, t, cond, guidance=None):
    """unet(x, t, cond) -> model output; for SDXL, splits the pooled row off `cond` (encode) and adds
    the micro-conditioning time ids (original size, crop (0, 0), target size: the model's image size). FLUX, as
    its pipeline: 2x2 patches packed into tokens with their position ids, timestep / 1000, and (FLUX-dev) the
    guidance input (`guidance`, else pipe.embedded_guidance); the output unpacked to x's shape."""
    dt = pipe.unet.dtype  # outside autocast, inputs follow the weights (a bf16 base, fp32 training)
    x, cond = x.to(dt), cond.to(dt)
    if pipe.family == "flux":
        B, C, H, W = x.shape
        tokens = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        img_ids = torch.zeros(H // 2, W // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(H // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(W // 2, device=x.device)[None, :]
        g = torch.full((B,), float(pipe.embedded_guidance if guidance is None else guidance), device=x.device)
        out = unet(hidden_states=tokens, timestep=t / 1000, guidance=g if pipe.unet.config.guidance_embeds else None,
                   pooled_projections=cond[:, -1, :pipe.unet.config.pooled_projection_dim],
                   encoder_hidden_states=cond[:, :-1], txt_ids=torch.zeros(cond.shape[1] - 1, 3, device=x.device),
                   img_ids=img_ids.reshape(-1, 3).to(dt)).sample
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    if pipe.family == "sd3":  # SD3's transformer: the sequence, the pooled row
        pooled = cond[:, -1, :pipe.unet.config.pooled_projection_dim]
        return unet(hidden_states=x, timestep=t, encoder_hidden_states=cond[:, :-1], pooled_projections=pooled).sample
    if pipe.family == "sd":
        return unet(x, t, cond).sample
    pooled = cond[:, -1, :pipe.text_encoder_2.config.projection_dim]
    size = pipe.image_size
    time_ids = torch.tensor([size, size, 0, 0, size, size], device=x.device, dtype=cond.dtype).expand(len(x), 6)
    return unet(x, t, cond[:, :-1], added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


@torch.no_grad()
def to_images(pipe, x0, batch_size=16):
    """The model's clean space -> images (B,3,H,W) in [0,1], float32 (latents: VAE-decoded, no graph; z / scale
    + shift, the shift of SD3's VAE)."""
    if pipe.vae is None:
        return ((x0.float() + 1) / 2).clamp(0, 1)
    v, shift = pipe.vae, getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return torch.cat([((v.decode((z / v.config.scaling_factor + shift).to(v.dtype)).sample.float() + 1) / 2).clamp(0, 1)
                      for z in x0.split(batch_size)])


@torch.no_grad()
def from_images(pipe, images):
    """Images (B,3,H,W) in [0,1] -> the model's clean space: resized to its size, for a latent model
    VAE-encoded ((posterior mean - shift) x scale). Dataset images enter this way."""
    x = images.float().to(pipe.device) * 2 - 1
    if x.shape[-1] != pipe.image_size:
        x = torch.nn.functional.interpolate(x, size=(pipe.image_size,) * 2, mode="bilinear", antialias=True)
    if pipe.vae is None:
        return x
    v, shift = pipe.vae, getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (v.encode(x.to(v.dtype)).latent_dist.mean.float() - shift) * v.config.scaling_factor


def size_step(folder):
    """The image sides a folder's model takes are the multiples of this: the VAE's downsampling x the denoiser's
    (a UNet: 2 per down block but the last; a transformer: its patch, FLUX's 2x2 packing), from its configs alone."""
    vae, unet, tr = (_config_json(folder, d) for d in ("vae", "unet", "transformer"))
    step = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1
    if unet:
        return step * 2 ** (len(unet.get("down_block_types", ())) - 1)
    return step * (2 if (tr or {}).get("_class_name") == "FluxTransformer2DModel" else (tr or {}).get("patch_size", 1))


def _config_json(folder, sub):
    """folder/sub/config.json as a dict (None where there is none); a broken one is one error line naming it."""
    path = os.path.join(folder, sub, "config.json")
    try:
        return json.load(open(path)) if os.path.isfile(path) else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load {os.path.join(folder, sub)} ({type(e).__name__}: {e})") from None


def check_resolution(folder, resolution):
    """One error line unless resolution is 0 (the model's own) or a positive multiple of size_step(folder)."""
    step = size_step(folder)
    if not (isinstance(resolution, int) and resolution >= 0 and resolution % step == 0):
        raise SystemExit(f"error: resolution={resolution!r}: {folder!r} takes 0 (its own size) or a positive multiple "
                         f"of {step} pixels (its VAE's and denoiser's downsampling)")


def is_flow_config(scheduler_config):
    return scheduler_config.get("_class_name", "").startswith("FlowMatch")


def folder_is_flow(folder):
    """Whether load_model gives the folder a flow-matching scheduler (a FlowMatch* config), without loading it."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    try:
        return os.path.isfile(path) and is_flow_config(json.load(open(path)))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load {os.path.dirname(path)} ({type(e).__name__}: {e})") from None


def folder_family(folder):
    """The family load_model gives a folder (sd, sdxl, sd3, flux), from its config files alone."""
    name = (_config_json(folder, "transformer") or {}).get("_class_name", "")
    return family_of(name, os.path.isdir(os.path.join(folder, "text_encoder_2")))
