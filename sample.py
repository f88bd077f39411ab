"""
Sampling, the lowest layer: load a diffusers-style folder, the DDIM step with its x0 prediction and
per-step targets, the batched rollout, image grids, and configure() (every script's config helper).

    python sample.py --prompt="two red circles" --num_images=16           # built-in toy model, CPU
    python sample.py --model=out/sharpen_rlhf/model --prompt="a red circle left of a blue square"
    python sample.py --device=cuda --model=/path/to/local/diffusers/folder --prompt="..."
"""
import ast
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TOY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy-model")

# -----------------------------------------------------------------------------
# defaults for the CLI (override with --key=value)
model = TOY_MODEL        # a diffusers-style folder: unet/ text_encoder/ tokenizer/ scheduler/ [vae/]
prompt = "two red circles"
num_images = 16          # images of the prompt, in one grid
num_steps = 20           # DDIM steps
guidance = 1.0           # classifier-free guidance scale; 1.0 = conditional only (half the NFE; best for the toy model on train prompts)
uncond_embed = "auto"    # CFG's unconditional input: auto (the folder's pipeline: zeros for SDXL, else "") | zeros | empty
resolution = 0           # image side in pixels (0: the model's own; FLUX: 1024)
eta = 0.0                # DDIM eta: 0 deterministic, 1 DDPM-like
seed = 0
out = "samples.png"
device = "cpu"
# -----------------------------------------------------------------------------


def configure(config, argv):
    """Override the dict `config` (a script's globals) in place, nanoGPT's way, in argv order (later win): `path/x.py`
    runs the file and takes the names it sets, `--key=value` parses value as a Python literal, else a string, a bare
    `--flag` sets a bool True. Settable: lowercase names config holds, each with its type. Returns those {k: v}."""
    keys = {k for k, v in config.items() if not k.startswith("_") and k.islower()
            and isinstance(v, (int, float, bool, str, type(None), tuple, list))}

    def put(key, val, where):
        if key not in keys:
            raise SystemExit(f"error: unknown config key {key!r}{where} (known: {', '.join(sorted(keys))})")
        old = config[key]
        if isinstance(old, float) and (type(val) is int or val in ("inf", "-inf", "nan")):  # strings: not literals
            val = float(val)
        if old is not None and type(val) is not type(old):
            raise SystemExit(f"error: --{key}{where} expects {type(old).__name__}, got {type(val).__name__} {val!r}")
        print(f"override: {key} = {val!r}{where}")
        config[key] = val

    for arg in argv:
        if not arg.startswith("-") and arg.endswith(".py"):  # a config file
            try:
                code = compile(open(arg, encoding="utf-8").read(), arg, "exec")
            except OSError as e:
                raise SystemExit(f"error: cannot read config file {arg!r} ({e.strerror})") from None
            except SyntaxError as e:
                raise SystemExit(f"error: config file {arg!r} line {e.lineno}: {e.msg}") from None
            exec(code, ns := {"__file__": os.path.abspath(arg)})  # a file may run another beside it
            for key, val in ns.items():
                if not key.startswith("_") and not isinstance(val, type(os)):
                    put(key, val, f" (from {arg})")
            continue
        if arg.startswith("--") and "=" not in arg and isinstance(config.get(arg[2:]), bool):
            arg += "=True"
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: expected --key=value or a config file path/name.py, got {arg!r}")
        key, val = arg[2:].split("=", 1)
        try:
            val = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            pass  # a plain string
        put(key, val, "")
    return {k: config[k] for k in sorted(keys)}


def read_prompts(path):
    """The non-blank lines of a UTF-8 text file, stripped; one error line if it cannot be read or has none."""
    try:
        prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read prompt_file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if not prompts:
        raise SystemExit(f"error: prompt_file {path!r} has no prompts (one per line)")
    return prompts


# -----------------------------------------------------------------------------
# the model: a diffusers-style folder

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

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def family(self):  # sd | sdxl | sd3 | flux: how prompts are encoded and the denoiser is called
        return family_of(type(self.unet).__name__, self.text_encoder_2 is not None)

    @property
    def denoiser(self):  # the folder (and model_index) name of what `unet` holds
        return "unet" if type(self.unet).__name__ == "UNet2DConditionModel" else "transformer"

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


def check_model_folder(folder):
    """Fail with one line unless `folder` has the subfolders load_model reads."""
    has = lambda d: os.path.isdir(os.path.join(folder, d))
    missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler") if not has(d)
               and not (d == "unet" and has("transformer"))]
    if missing:
        raise SystemExit(f"error: model folder {folder!r} lacks {', '.join(m + '/' for m in missing)} "
                         "(expected a diffusers-style folder: unet/ text_encoder/ tokenizer/ scheduler/ [vae/])")


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
    check_model_folder(folder)
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
    check_resolution(folder, resolution)
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
    its scheduler, SDXL's uncond convention). The pixel-space toy model gets none: StableDiffusionPipeline would run it without a VAE
    (vae=None, output_type="latent"), but it turns clip_sample off, and the toy model's DDIM clips x0.
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


def randn(shape, generators, device="cpu"):
    """One N(0, I) draw of `shape` per generator, stacked: a batch equals its items drawn one by one."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


# -----------------------------------------------------------------------------
# the DDIM step (Song et al. 2020, arXiv 2010.02502, Eq. 12) and the per-step targets

def is_flow(pipe):
    """A flow-matching model (FlowMatchEulerDiscreteScheduler: x_t = (1 - sigma) x0 + sigma eps, velocity output)."""
    return type(pipe.scheduler).__name__.startswith("FlowMatch")


def alpha_bars(pipe, t):
    """alpha_bar at integer timesteps t (tensor); t < 0 is the end of sampling: alpha_bar 1 where the config sets
    set_alpha_to_one, else alphas_cumprod[0] (the last step keeps a trace of noise, as diffusers' DDIM)."""
    ab = pipe.scheduler.alphas_cumprod.to(pipe.device)
    end = torch.as_tensor(pipe.scheduler.final_alpha_cumprod, dtype=ab.dtype, device=pipe.device)
    return torch.where(t >= 0, ab[t.clamp(min=0)], end)


def coeffs(pipe, t, dim=4):
    """(a, s) of x_t = a * x0 + s * eps at timesteps t (B,), shaped to broadcast over `dim`-d states.
    DDIM: a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar). Flow: a = 1 - sigma, s = sigma = t / num_train_timesteps."""
    shape = (-1, *[1] * (dim - 1))
    if is_flow(pipe):
        sigma = (t.double() / pipe.scheduler.config.num_train_timesteps).float().view(shape)
        return 1 - sigma, sigma
    ab = alpha_bars(pipe, t).view(shape)
    return ab.sqrt(), (1 - ab).sqrt()


def train_timesteps(pipe, n, generator):
    """n training timesteps, uniform: DDIM's integers 0..T-1; flow's t = 1..T (sigma = t / T in (0, 1])."""
    T = pipe.scheduler.config.num_train_timesteps
    if is_flow(pipe):
        return torch.randint(1, T + 1, (n,), generator=generator).float()
    return torch.randint(0, T, (n,), generator=generator)


def add_noise(pipe, x0, t, eps):
    """q(x_t | x0): x_t = a_t * x0 + s_t * eps at timesteps t (B,) (coeffs)."""
    a, s = coeffs(pipe, t, x0.dim())
    return a * x0 + s * eps


def passes_per_call(guidance, family="sd"):
    """UNet image-passes per sampler step: 2 with classifier-free guidance (the unconditional half), else 1
    (FLUX: always 1, its guidance is an input)."""
    return 1 + (guidance != 1.0 and family != "flux")


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


def prediction(pipe):
    """What the model outputs: epsilon | v_prediction (DDIM) | flow (the velocity eps - x0)."""
    return "flow" if is_flow(pipe) else pipe.scheduler.config.prediction_type


def split_prediction(pipe, x_t, model_out, t):
    """model output -> (x0_pred, eps_pred) at timesteps t (B,), for eps-, v- or flow (velocity) prediction."""
    a, s = coeffs(pipe, t, x_t.dim())
    kind = prediction(pipe)
    if kind == "epsilon":
        return (x_t - s * model_out) / a, model_out
    if kind == "v_prediction":  # v = a*eps - s*x0  =>  x0 = a*x_t - s*v,  eps = a*v + s*x_t  (a^2 + s^2 = 1)
        return a * x_t - s * model_out, a * model_out + s * x_t
    if kind == "flow":  # v = eps - x0  =>  x0 = x_t - sigma*v,  eps = x_t + (1 - sigma)*v
        return x_t - s * model_out, x_t + a * model_out
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def param_target(pipe, eps, x0, t):
    """The model's own parameterisation of (eps, x0) at timesteps t: eps, v = a*eps - s*x0, or eps - x0 (flow)."""
    kind = prediction(pipe)
    if kind == "flow":
        return eps - x0
    if kind != "v_prediction":
        return eps
    a, s = coeffs(pipe, t, eps.dim())
    return a * eps - s * x0


def training_target(pipe, x_t, x0, t):
    """The exact targets for x_t reached from the clean x0: (param_target of eps, eps = (x_t - a*x0)/s)."""
    a, s = coeffs(pipe, t, x_t.dim())
    eps = (x_t - a * x0) / s
    return param_target(pipe, eps, x0, t), eps


def ddim_sigma(pipe, t, t_prev, eta, shape=(-1, 1, 1, 1)):
    """sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev), broadcastable; and ab_prev."""
    ab, ab_prev = alpha_bars(pipe, t).view(shape), alpha_bars(pipe, t_prev).view(shape)
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt(), ab_prev


def ddim_step(pipe, x_t, model_out, t, t_prev, eta=0.0, noise=None):
    """One sampler step -> (x_prev, x0_pred, eps_pred). DDIM: x_prev = sqrt(ab_prev)*x0 + sqrt(1 - ab_prev -
    sigma^2)*eps + sigma*noise, x0 clipped as the config says, eps not (diffusers' default). Flow: the Euler step
    of the probability-flow ODE, x_prev = x_t + (sigma_prev - sigma) * v (= (1 - sigma_prev) x0 + sigma_prev eps),
    as FlowMatchEulerDiscreteScheduler; deterministic only (its SDE form, for DDPO, is not implemented)."""
    x0, eps = split_prediction(pipe, x_t, model_out, t)
    if is_flow(pipe):
        if eta > 0:
            raise ValueError("flow-matching models sample with eta = 0 only (the stochastic step is DDIM's)")
        (_, s), (_, s_prev) = coeffs(pipe, t, x_t.dim()), coeffs(pipe, t_prev, x_t.dim())
        return x_t + (s_prev - s) * model_out, x0, eps
    cfg = pipe.scheduler.config
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    sigma, ab_prev = ddim_sigma(pipe, t, t_prev, eta, (-1, *[1] * (x_t.dim() - 1)))
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0, eps


def ddim_logprob(pipe, x_t, model_out, t, t_prev, eta, x_prev):
    """log N(x_prev; mean, sigma^2 I) of a stochastic DDIM step, averaged over pixels as DDPO (arXiv
    2305.13301) does: (B,), differentiable in model_out. sigma = 0 (the clean end): -inf/NaN."""
    mean, _, _ = ddim_step(pipe, x_t, model_out, t, t_prev, eta, torch.zeros_like(x_t))
    sigma, _ = ddim_sigma(pipe, t, t_prev, eta, (-1, *[1] * (x_t.dim() - 1)))
    lp = -(x_prev.detach() - mean) ** 2 / (2 * sigma ** 2) - sigma.log() - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def timesteps(pipe, num_steps):
    """The sampler's timesteps, noisiest first, plus the end: (num_steps + 1,). DDIM: long, the config's spacing
    and offset, -1 for the end; each step goes to the next timestep, as diffusers' DDIM does wherever the spacing
    is even (leading, trailing; for linspace, diffusers steps to t - 1000 // num_steps, off its own grid).
    Flow: float, sigma * num_train_timesteps with the config's shift, 0 for the end."""
    cfg, kw = pipe.scheduler.config, {}
    if pipe.family == "flux":  # its pipeline's sigmas
        kw["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    if is_flow(pipe) and cfg.get("use_dynamic_shifting"):  # mu from the latent's token count, as the pipelines
        C, H, W = pipe.latent_shape
        n = (H // pipe.patch) * (W // pipe.patch)  # tokens
        m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        kw["mu"] = n * m + cfg.base_shift - m * cfg.base_image_seq_len
    pipe.scheduler.set_timesteps(None if "sigmas" in kw else num_steps, **kw)
    if is_flow(pipe):
        return torch.cat([pipe.scheduler.timesteps.float(), torch.zeros(1)]).to(pipe.device)
    return torch.cat([pipe.scheduler.timesteps.long(), torch.tensor([-1])]).to(pipe.device)


def predict(pipe, x_t, t, cond, uncond=None, guidance=1.0, unet=None):
    """x_t (B,C,H,W) at t (int or (B,)), cond (B,L,E), uncond (1,L,E) -> guided output (B,C,H,W), in one UNet
    call (with guidance != 1 the unconditional half rides along). unet: a DDP wrapper, a frozen reference.
    FLUX has no CFG (FLUX-dev is guidance-distilled): `guidance` is its guidance input, one pass per step."""
    B, unet = x_t.shape[0], unet or pipe.unet
    tt = torch.as_tensor(t, device=x_t.device).expand(B)
    if pipe.family == "flux":
        return unet_call(pipe, unet, x_t, tt, cond, guidance)
    if guidance == 1.0:
        return unet_call(pipe, unet, x_t, tt, cond)
    out = unet_call(pipe, unet, torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([uncond.expand(B, -1, -1), cond]))
    out_u, out_c = out.chunk(2)
    return out_u + guidance * (out_c - out_u)


@dataclass
class Trajectory:
    """m DDIM steps of B trajectories. x is the state fed to each step; x_final the state after the last."""
    x: torch.Tensor           # (B, m, C, H, W)  x_{t_k}
    t: torch.Tensor           # (m,) or (B, m)   t_k, noisiest first (per trajectory where rollout got (B, m+1))
    model_out: torch.Tensor   # (B, m, C, H, W)  guided UNet output (eps or v)
    eps_pred: torch.Tensor    # (B, m, C, H, W)
    x0_pred: torch.Tensor     # (B, m, C, H, W)  clipped, in model space
    x_final: torch.Tensor     # (B, C, H, W)


def rollout(pipe, x, ts, cond, uncond=None, guidance=1.0, eta=0.0, generators=None, record=True, grad=False, unet=None):
    """DDIM from x at ts[0] through ts[-1] -> Trajectory (record=False: the final state). ts (m+1,) shared,
    or (B, m+1) per trajectory (Alg. 2 draws the noise level per sample). One UNet call per step for all B
    (K trajectories of a prompt: its cond repeated). eta > 0: step noise from `generators`, one per
    trajectory, so any one can be regenerated alone. grad=True keeps the graph through the chain."""
    rec = []
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for i in range(ts.shape[-1] - 1):
            t, t_prev = ts[..., i], ts[..., i + 1]  # 0-dim, or (B,) per trajectory
            out = predict(pipe, x, t, cond, uncond, guidance, unet)
            noise = randn(x.shape[1:], generators, x.device) if eta > 0 else None
            x_prev, x0_pred, eps = ddim_step(pipe, x, out, t.expand(len(x)), t_prev.expand(len(x)), eta, noise)
            if record:
                rec.append((x, out, eps, x0_pred))
            x = x_prev
    if not record:
        return x
    x_t, out, eps, x0_pred = (torch.stack(r, 1) for r in zip(*rec))
    return Trajectory(x_t, ts[..., :-1], out, eps, x0_pred, x)


def state_targets(pipe, traj, x0):
    """The exact (target, eps) of traj's states (B, m, C, H, W), no graph, towards x0 (B, C, H, W): the image
    noised to the start, or traj.x0_pred[:, -1], each trajectory's outcome (whose target at the last state
    is the model's own output wherever x0 was not clipped)."""
    B, m = traj.x.shape[:2]
    tgt, eps = training_target(pipe, traj.x.flatten(0, 1).detach(), x0.detach().repeat_interleave(m, 0),
                               traj.t.expand(B, m).reshape(-1))
    return tgt.view_as(traj.x), eps.view_as(traj.x)


@torch.no_grad()
def sample(pipe, prompts, seeds, num_steps=20, guidance=1.0, eta=0.0, batch_size=64, progress=False):
    """Images (B,3,H,W) in [0,1], prompts[i] from seeds[i], each the same whatever the batch; progress: a tty bar."""
    from tqdm import tqdm
    ts, u = timesteps(pipe, num_steps), uncond(pipe)
    shape = pipe.latent_shape
    images = []
    for i in tqdm(range(0, len(prompts), batch_size), disable=not (progress and sys.stderr.isatty()), desc="sampling"):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        x = randn(shape, gens, pipe.device)
        x = rollout(pipe, x, ts, encode(pipe, prompts[i:i + batch_size]), u, guidance, eta, gens, record=False)
        images.append(to_images(pipe, x))
    return torch.cat(images)


def save_grid(images, captions, path, scale=4, ncol=8):
    """images (B,3,H,W) in [0,1] -> a PNG grid, each tile upscaled and captioned underneath."""
    from PIL import Image, ImageDraw
    B, _, H, W = images.shape
    ncol = min(B, ncol)
    nrow = (B + ncol - 1) // ncol
    tw, th, cap = W * scale, H * scale, 24  # tile size and caption band (two lines of the default font)
    canvas = Image.new("RGB", (ncol * (tw + 4), nrow * (th + cap + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i in range(B):
        x, y = (i % ncol) * (tw + 4), (i // ncol) * (th + cap + 4)
        canvas.paste(Image.fromarray(arr[i]).resize((tw, th), Image.NEAREST), (x + 2, y + 2))
        draw.text((x + 2, y + th + 3), "\n".join(textwrap.wrap(captions[i], width=tw // 6)[:2]), fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    for ok, message in [  # every setting with a range, checked before the model loads: one error line
            (num_images >= 1, f"--num_images must be >= 1, got {num_images}"),
            (num_steps >= 1, f"--num_steps must be >= 1, got {num_steps}"),
            (seed >= 0, f"--seed must be >= 0, got {seed}"),
            (0 <= guidance < math.inf, f"--guidance must be a finite scale >= 0 (1: conditional only), got {guidance}"),
            (0 <= eta < math.inf, f"--eta must be a finite DDIM eta >= 0 (0: deterministic), got {eta}"),
            (resolution >= 0, f"--resolution must be 0 (the model's) or a positive side in pixels, got {resolution}"),
            (uncond_embed in ("auto", "zeros", "empty"), f"--uncond_embed must be auto, zeros or empty, got {uncond_embed!r}"),
            (os.path.splitext(out)[1].lower() in (".png", ".jpg", ".jpeg"), f"--out must end in .png or .jpg, got {out!r}"),
            (not device.startswith("cuda") or torch.cuda.is_available(), "--device=cuda but no CUDA device is available")]:
        if not ok:
            raise SystemExit(f"error: {message}")
    check_model_folder(model)  # and what the folder's configs allow, still before the model loads
    check_resolution(model, resolution)
    if eta > 0 and folder_is_flow(model):
        raise SystemExit(f"error: {model} is a flow-matching model: --eta must be 0, got {eta}")
    torch.set_num_threads(os.cpu_count())
    pipe = load_model(model, device, uncond=uncond_embed, resolution=resolution)
    images = sample(pipe, [prompt] * num_images, [seed + i for i in range(num_images)],
                    num_steps, guidance, eta, progress=True)
    save_grid(images, [prompt] * num_images, out)
    print(f"wrote {num_images} images of {prompt!r} to {out} "
          f"({num_steps} {'Euler' if is_flow(pipe) else 'DDIM'} steps, guidance {guidance}, "
          f"NFE/image {num_steps * passes_per_call(guidance, pipe.family)})")
