"""
The built-in DDIM model's sampler, chosen by fidelity on train prompts: the base model's samples under three
ways of treating the x0 prediction at each step, with gold (paired against the per-step clip, the built-in model's
sampler until this measurement chose noclip) and fidelity.py's measures.

    clip       x0 clipped to [-1, 1] at every step, eps as the model gave it (diffusers' DDIM default, clip_sample)
    clip_eps   x0 clipped, eps re-derived from the clipped x0 (diffusers' use_clipped_model_output=True)
    noclip     no per-step clip (clip_sample false); the images are clamped to [0, 1] at the end (models.to_images)

    python dev/sampler_fidelity.py                       # 64 train prompts x 8 seeds, ~3 min on 2 cores
    python dev/sampler_fidelity.py --grid=variants.png   # and the first seed of 16 prompts, one column per variant

The toy world's palette sits on the corners of the RGB cube, so a per-step clip removes only outward errors and
pulls every sample toward grey. Results: docs/notes.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python dev/sampler_fidelity.py

import torch  # noqa: E402

import eval as E  # noqa: E402
import figures as FIG  # noqa: E402
import fidelity as F  # noqa: E402
import models as M  # noqa: E402
import sample as S  # noqa: E402

# -----------------------------------------------------------------------------
model = M.TOY_MODEL      # a DDIM model folder (its scheduler's clip_sample is set per row)
per_skill = 16           # train prompts per skill
seeds = 8                # seeds per prompt
num_steps = 20
grid = ""                # a .png: the first seed of up to 16 prompts under each variant
threads = 0              # torch threads (0 = every core)
# -----------------------------------------------------------------------------
DDIM_STEP = S.ddim_step


def clip_eps_step(pipe, x_t, model_out, t, t_prev, eta=0.0, noise=None):
    """S.ddim_step with eps re-derived from the clipped x0, eps = (x_t - a x0) / s, as diffusers'
    use_clipped_model_output."""
    _, x0, _ = DDIM_STEP(pipe, x_t, model_out, t, t_prev, eta, noise)
    a, s = S.coeffs(pipe, t, x_t.dim())
    eps = (x_t - a * x0) / s
    sigma, ab_prev = S.ddim_sigma(pipe, t, t_prev, eta, (-1, *[1] * (x_t.dim() - 1)))
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    return (x_prev + sigma * noise if eta > 0 else x_prev), x0, eps


def main():
    S.configure(globals(), sys.argv[1:])
    if per_skill < 1 or seeds < 1 or num_steps < 1 or threads < 0:
        raise SystemExit("error: per_skill, seeds and num_steps must be >= 1, threads >= 0")
    M.check_model_folder(model)
    if M.folder_is_flow(model):
        raise SystemExit(f"error: {model!r} is a flow-matching model: it has no DDIM x0 (clip_sample) to compare")
    torch.set_num_threads(threads or os.cpu_count())
    pipe = M.load_model(model)
    prompts, seed_list = E.prompts_and_seeds("train", per_skill, seeds)
    reference = F.denoise_loss(pipe, F.renders(prompts, seed_list), prompts)
    rows, golds, columns = [], {}, []
    for name in ("clip", "clip_eps", "noclip"):
        S.ddim_step = clip_eps_step if name == "clip_eps" else DDIM_STEP  # rollout looks it up at each step
        pipe.scheduler.register_to_config(clip_sample=name != "noclip")
        images = S.sample(pipe, prompts, seed_list, num_steps=num_steps)
        golds[name] = E.gold(images, prompts)["rewards"]
        fid = F.fidelity(images, prompts, seed_list, pipe, reference)
        d = golds[name] - golds["clip"]
        per_t = " / ".join(f"{own:.4f}" for own, _ in fid["denoise_per_t"].values())
        rows.append(f"| {name} | {golds[name].mean():.3f} | {d.mean():+.4f} ± {d.std() / len(d) ** 0.5:.4f} | "
                    f"{fid['background']:.4f} | {fid['palette']:.4f} | {per_t} | {fid['denoise']:.2f} |")
        columns.append(images[::seeds][:16])
        print(rows[-1], flush=True)
    S.ddim_step = DDIM_STEP
    ts = ", ".join(map(str, F.DENOISE_T))
    print(f"\n| sampler | gold | Δ gold vs clip ± SE | background | palette | denoise loss at t = {ts} | denoise × |\n"
          "|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
          f"\n\n{len(prompts)} images (train prompts x {seeds} seeds), {num_steps} DDIM steps; renders: background 0, "
          f"palette 0, denoise loss {' / '.join(f'{v:.4f}' for v in reference.values())}.")
    if grid:
        FIG.comparison_grid(grid, columns, ["clip", "clip_eps", "noclip"], prompts[::seeds][:16], tile=2.0)
        print(f"wrote {grid}")


if __name__ == "__main__":
    main()
