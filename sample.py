"""
The sampler: the DDIM step (and the flow models' Euler step) with its x0 prediction and per-step targets, the
timestep schedule, the batched rollout that records a trajectory, image grids, and configure() (every script's
config helper). The model it steps (load, encode, the denoiser call) is models.py's.

    python sample.py --prompt="two red circles" --num_images=16           # built-in toy model, CPU
    python sample.py --model=out/sharpen_rlhf/model --prompt="a red circle left of a blue square"
    python sample.py --device=cuda --model=/path/to/local/diffusers/folder --prompt="..."
"""
import ast
import math
import os
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import torch

import models as M

# -----------------------------------------------------------------------------
# defaults for the CLI (override with --key=value)
model = M.TOY_MODEL        # a diffusers-style folder: unet/ text_encoder/ tokenizer/ scheduler/ [vae/]
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


def flow_sde(pipe, x_t, t, t_prev, a):
    """Flow-GRPO's SDE form of the flow step (arXiv 2505.05470, Eq. 9-10; its sde_step_with_logprob), noise level a,
    dt = sigma_prev - sigma < 0: x_prev = x_t (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
    + g sqrt(-dt) z, with g = a sqrt(sigma / (1 - sigma)) (sigma = 1, the first step: 1 - sigma_prev below) ->
    (the coefficients of x_t and v in the mean, the noise std g sqrt(-dt)); a = 0 is the Euler step."""
    (_, s), (_, s_prev) = coeffs(pipe, t, x_t.dim()), coeffs(pipe, t_prev, x_t.dim())
    dt, g2 = s_prev - s, a ** 2 * s / (1 - torch.where(s == 1, s_prev, s))
    return 1 + g2 * dt / (2 * s), (1 + g2 * (1 - s) / (2 * s)) * dt, (g2 * -dt).sqrt()


def ddim_step(pipe, x_t, model_out, t, t_prev, eta=0.0, noise=None):
    """One sampler step -> (x_prev, x0_pred, eps_pred). DDIM: x_prev = sqrt(ab_prev)*x0 + sqrt(1 - ab_prev -
    sigma^2)*eps + sigma*noise, x0 clipped as the config says, eps not (diffusers' default). Flow: the Euler step
    of the probability-flow ODE, x_prev = x_t + (sigma_prev - sigma) * v (= (1 - sigma_prev) x0 + sigma_prev eps),
    as FlowMatchEulerDiscreteScheduler; with eta > 0, Flow-GRPO's SDE with noise level eta (flow_sde)."""
    x0, eps = split_prediction(pipe, x_t, model_out, t)
    if is_flow(pipe):
        if eta > 0:
            cx, cv, std = flow_sde(pipe, x_t, t, t_prev, eta)
            return cx * x_t + cv * model_out + std * noise, x0, eps
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


def step_std(pipe, x_t, t, t_prev, eta):
    """The noise std of a stochastic sampler step (DDIM's sigma_t, or flow_sde's), broadcastable over x_t."""
    return flow_sde(pipe, x_t, t, t_prev, eta)[2] if is_flow(pipe) else \
        ddim_sigma(pipe, t, t_prev, eta, (-1, *[1] * (x_t.dim() - 1)))[0]


def ddim_logprob(pipe, x_t, model_out, t, t_prev, eta, x_prev):
    """log N(x_prev; mean, sigma^2 I) of a stochastic sampler step (DDIM, or the flow SDE), averaged over pixels as
    DDPO (arXiv 2305.13301) and Flow-GRPO do: (B,), differentiable in model_out. sigma = 0 (DDIM's clean end): -inf/NaN."""
    mean, _, _ = ddim_step(pipe, x_t, model_out, t, t_prev, eta, torch.zeros_like(x_t))
    sigma = step_std(pipe, x_t, t, t_prev, eta)
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
        return M.unet_call(pipe, unet, x_t, tt, cond, guidance)
    if guidance == 1.0:
        return M.unet_call(pipe, unet, x_t, tt, cond)
    out = M.unet_call(pipe, unet, torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([uncond.expand(B, -1, -1), cond]))
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
    ts, u = timesteps(pipe, num_steps), M.uncond(pipe)
    shape = pipe.latent_shape
    images = []
    for i in tqdm(range(0, len(prompts), batch_size), disable=not (progress and sys.stderr.isatty()), desc="sampling"):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        x = randn(shape, gens, pipe.device)
        x = rollout(pipe, x, ts, M.encode(pipe, prompts[i:i + batch_size]), u, guidance, eta, gens, record=False)
        images.append(M.to_images(pipe, x))
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
    M.check_model_folder(model, resolution)  # what its configs allow, before it loads
    torch.set_num_threads(os.cpu_count())
    pipe = M.load_model(model, device, uncond=uncond_embed, resolution=resolution)
    images = sample(pipe, [prompt] * num_images, [seed + i for i in range(num_images)],
                    num_steps, guidance, eta, progress=True)
    save_grid(images, [prompt] * num_images, out)
    print(f"wrote {num_images} images of {prompt!r} to {out} "
          f"({num_steps} {'Euler' if is_flow(pipe) else 'DDIM'} steps, guidance {guidance}, "
          f"NFE/image {num_steps * passes_per_call(guidance, pipe.family)})")
