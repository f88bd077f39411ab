"""
What every training method shares: the Run it is handed (the config, the model, the schedule, the ranks, what the
run has spent), the train prompts and the seeds of every random draw, and the rollout helpers: roll a batch of
prompts' trajectories from a noise level, recompute their outputs with grad, sample and score with counting.

The method contract. A method is two top-level functions (train.py's METHODS maps a name to them; the paper's two
are in sharpen.py, what they are compared with in baselines.py):
    prepare(run, it, micro) -> batch     this rank's part of optimizer step it, micro-step micro, without a graph:
                                         sampling, scoring, selection. batch["count"]: the prompts, pairs or images
                                         its loss averages over (0: nothing to train on); batch["info"]: its log
                                         columns, NaN where undefined (a rank with no pair has no accuracy)
    loss(run, batch) -> (loss, info)     the mean loss over those `count` with grad, and the log columns
train.py calls loss only where count > 0; elsewhere it runs run.idle_loss() with batch["info"], so that every rank
issues the same all-reduces. What a method changes lives on the run, visibly: run.spent (UNet image-passes and
images scored, counted where they happen), run.rounds (ddpo's and raft's sampled rounds, checkpointed) and run.pool
(diffusion_dpo's pairs).
"""
import contextlib
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

import models as M
import sample as S
import toyworld


def seed_for(seed, purpose, a, b=0):
    """Every random draw's seed in a training run, from the run's seed and global indices (a prompt's draws do not
    depend on its rank or micro-step): a = global prompt index g, or the step (b: the index in it)."""
    return {"prompt": seed * 1_000_003 + a, "scene": (seed * 1_000_003 + a) * 4096 + b,
            "noise": (seed * 1_000_003 + a) * 64 + b, "sample": seed * 31 + a, "render": seed + a,
            "t noise": (seed * 7919 + a) * 1_000_003 + b, "pool": seed * 7 + a, "pool prompts": seed * 99991,
            "ddpo t": seed + a * 131 + b, "replay": (seed * 1_000_033 + a) * 4096 + b,
            "replay noise": (seed * 7927 + a) * 4096 + b, "alttext": (seed * 1_000_037 + a) * 4096 + b,
            "nft t": seed * 1_000_039 + a}[purpose]


def parse_range(start_range):
    """'a:b' with 0 <= a <= b <= 1 -> (a, b); '' -> (0, 1); else None."""
    try:
        f = tuple(float(v) for v in start_range.split(":")) if start_range else (0.0, 1.0)
    except (ValueError, AttributeError):
        return None
    return f if len(f) == 2 and 0 <= f[0] <= f[1] <= 1 else None


def step_range(start_range, num_steps, m):
    """start_range 'a:b' (fractions of the schedule, 0 <= a <= b <= 1; '' = anywhere) -> the sampler steps (lo, hi)
    a rollout may start from, leaving room for its m steps. ValueError if it is not of that form."""
    f = parse_range(start_range)
    if f is None:
        raise ValueError(start_range)
    return tuple(min(round(v * num_steps), num_steps - m) for v in f)


def start_steps(gidx, k_range, seed):
    """The DDIM step each prompt's rollouts start from, drawn per prompt as Alg. 2 draws t per sample, from
    (seed, global index) alone: the same prompt starts at the same step whatever its rank or micro-step."""
    return [random.Random((seed * 1_000_003 + g) * 17).randint(*k_range) for g in gidx]


def ddpo_steps(c):
    """How many of the sampler's steps one ddpo optimizer step trains (of its num_steps - 1 stochastic ones), or
    diffusion_nft trains per sample (of num_steps)."""
    T = c.num_steps - (c.method != "diffusion_nft")
    return max(1, round(c.timestep_fraction * T)) if c.timestep_fraction else min(c.m_steps, T)


def planned_nfe(c, family="sd"):
    """Planned UNet cost of one optimizer step of config c, all ranks, in image forward passes: CFG counts 2 (FLUX:
    1, see sample.passes_per_call), a pass with grad counts 3 (forward + backward). The run also counts what it
    does (run.spent, the `nfe` log column)."""
    g, P, n, m, T = S.passes_per_call(c.guidance, family), c.prompts_per_step, c.n_traj, c.m_steps, c.num_steps
    return {"pretrain": 3 * c.batch_size, "sft": 3 * P, "continued": 3 * P,
            "sharpen_sft": P * (n * m * g + 3 * (1 if c.lam == 0 else n) * m  # rollouts + selected, with grad
                                + n * g * (T - m - sum(step_range(c.start_range, T, m)) / 2) * (c.sft_target == "final")),
            "sharpen_rlhf": P * (T * g + n * m * g + 3 * 2 * m + 2 * m),  # sample, rollouts, w/l x policy/ref
            "diffusion_dpo": P * (3 * 2 + 2),  # winner and loser through policy and reference (+ the pool, once)
            "ddpo": P * n * (T * g / c.ppo_epochs + (3 + (c.ddpo_kl > 0)) * ddpo_steps(c) * g),  # + the reference
            "diffusion_nft": P * n * (T * g + ddpo_steps(c) * (3 + 1 + (c.nft_kl > 0))),  # sample; theta, old, ref
            "raft": P * (c.raft_n * T * g / c.raft_epochs + 3)}[c.method] + 3 * c.replay  # best of raft_n; anchor


def batch_line(c, P, world):
    """The batch arithmetic of config c with P prompts (pretrain: images) per rank per micro-step, printed at start."""
    per_step = c.batch_size if c.method == "pretrain" else c.prompts_per_step
    if c.method == "pretrain":
        return f"batch: {P} images x {c.grad_accum} micro-steps x {world} ranks = {per_step} per step"
    if c.method == "raft":
        pool = max(c.raft_pool, per_step)
        return (f"batch: {per_step} prompts per step, each the {'best' if c.raft_select == 'best' else 'first'} of "
                f"{c.raft_n} samples, from a pool of {pool} sampled every {c.raft_epochs * pool // per_step} steps"
                + (f", + {c.replay} pretraining scenes" if c.replay else ""))
    return (f"batch: {P} prompts x {c.n_traj} trajectories x {c.m_steps} steps per micro-step per rank; "
            f"{c.grad_accum} micro-steps x {world} ranks = {per_step} prompts = {per_step * c.n_traj} trajectories = "
            f"{per_step * c.n_traj * c.m_steps} scored x0 per step")


@dataclass
class Run:
    """What a method is handed. cfg: train.py's resolved config as attributes (cfg.n_traj, cfg.lam, ...)."""
    cfg: SimpleNamespace
    pipe: M.Pipe
    net: torch.nn.Module = None       # the trained denoiser as passes with grad see it (DDP-wrapped, compiled)
    text_net: torch.nn.Module = None  # pretrain, train_text_encoder: the trained text encoder (DDP-wrapped)
    ref: torch.nn.Module = None       # the frozen reference of the DPO losses (the base model)
    reward_fn: object = None          # reward.make_reward's callable; call it through run.score
    rank: int = 0
    world: int = 1
    P: int = 0                        # prompts (pretrain: images) per rank per micro-step
    per_step: int = 0                 # prompts (images) per optimizer step, over all ranks and micro-steps
    prompts: list = field(default_factory=list)  # prompt_file's lines ([]: toy-world captions)
    device: str = "cpu"
    amp_dtype: torch.dtype = torch.float32
    master: bool = True
    quiet: bool = True                # no progress bars
    spent: dict = field(default_factory=lambda: dict(nfe=0, scored=0))  # image-passes (grad x3), images scored
    rounds: dict = field(default_factory=dict)  # ddpo, raft, diffusion_nft: {(round, micro): the sampled round}
    old: torch.nn.Module = None       # diffusion_nft: the old (sampling) policy, a frozen copy that follows the net
    pool: list = field(default_factory=list)    # diffusion_dpo: [x_w, x_l, prompts]
    timing: dict = field(default_factory=lambda: defaultdict(float))  # --profile: seconds per phase this step

    def __post_init__(self):
        c = self.cfg
        self.ts = S.timesteps(self.pipe, c.num_steps)  # the sampler schedule every trajectory follows (num_steps+1,)
        self.uncond = M.uncond(self.pipe)
        self.k_range = step_range(c.start_range, c.num_steps, c.m_steps)  # the start steps, room for m steps left
        self._t_fwd = []

    def seed_for(self, purpose, a, b=0):
        return seed_for(self.cfg.seed, purpose, a, b)

    def all_rounds(self):
        """Every rank's rounds, in rank order (a collective: every rank calls it), for the checkpoint."""
        if self.world == 1:
            return [self.rounds]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, self.rounds)
        return out

    def first_index(self, it, micro):
        """Global index of this rank's first prompt in optimizer step it, micro-step micro: step it trains prompts
        it * per_step .. (it + 1) * per_step - 1 whatever the ranks and micro-steps."""
        return it * self.per_step + (micro * self.world + self.rank) * self.P

    def prompt_range(self, it, micro):
        first = self.first_index(it, micro)
        return range(first, first + self.P)

    def train_prompt(self, g, rng=None):
        """Train prompt number g (global index), or one from rng: a skill-balanced toy-world caption (uniform
        would be 80 % spatial), or a line of prompt_file."""
        rng = rng or random.Random(self.seed_for("prompt", g))
        return self.prompts[rng.randrange(len(self.prompts))] if self.prompts else \
            toyworld.caption(toyworld.random_spec(rng))

    def amp(self):
        return torch.autocast(self.device.split(":")[0], self.amp_dtype) if self.amp_dtype != torch.float32 \
            else contextlib.nullcontext()

    def clock(self):
        if self.device.startswith("cuda"):  # (profile only) GPU phases end where their kernels end
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def timed(self, key):
        if not self.cfg.profile:
            yield
            return
        t = self.clock()
        yield
        self.timing[key] += self.clock() - t

    def count_passes(self, *nets):
        """Count (and with --profile, time) every pass through these modules (None: skipped) in run.spent."""
        for net in nets:
            if net is not None:
                net.register_forward_pre_hook(self.count_pass, with_kwargs=True)
                if self.cfg.profile:
                    net.register_forward_hook(self.time_pass, with_kwargs=True)

    def count_pass(self, mod, args, kw):
        """A forward pre-hook on every counted UNet: image-passes where they happen, a pass with grad x3."""
        x = args[0] if args else kw.get("sample", kw.get("hidden_states"))  # a UNet's sample, a transformer's states
        self.spent["nfe"] += len(x) * (3 if torch.is_grad_enabled() else 1)
        if self.cfg.profile:
            self._t_fwd.append(self.clock())

    def time_pass(self, mod, args, kw, out):
        self.timing["unet fwd"] += self.clock() - self._t_fwd.pop()

    def profile_line(self, step, total):
        """--profile's log line: each phase's share of the step's `total` seconds (the unet phases include autocast's
        casts; other: sampler bookkeeping, encodes, data, logging, checkpoints)."""
        self.timing["other"] = total - sum(self.timing.values())
        return f"profile {step} | total {total * 1000:.0f}ms | " + " | ".join(
            f"{k} {100 * v / total:.1f}%" for k, v in self.timing.items())

    @contextlib.contextmanager
    def uncounted(self):
        """Passes and scores that are not training compute (the probe, a rebuilt pool): run.spent as before."""
        before = dict(self.spent)
        yield
        self.spent.update(before)

    def score(self, images, prompts):
        """The reward of images (B,3,H,W) in [0,1], float (NaN: not scored), counted in run.spent["scored"]."""
        with self.timed("reward"):
            self.spent["scored"] += len(images)
            return self.reward_fn(images, prompts)[0].float()

    def encode(self, prompts):
        """prompts -> their conditioning: through the trained text encoder (text_net, with grad) where it trains,
        else the frozen one's (models.encode)."""
        if self.text_net is None:
            return M.encode(self.pipe, prompts)
        return self.text_net(M.tokenize(self.pipe, prompts).to(self.device))[0]

    def idle_loss(self):
        """A zero-weight pass through the trained net (a rank-micro-step with nothing to train on): its backward
        all-reduces like any other, so every rank issues the same collectives (a trained text encoder's too: "" through
        it). One image-pass."""
        x = torch.zeros((1, *self.pipe.latent_shape), device=self.device)
        cond = self.uncond if self.text_net is None else self.encode([""])
        return M.unet_call(self.pipe, self.net, x, self.ts[:1], cond).float().sum() * 0.0


# -----------------------------------------------------------------------------
# the rollout helpers

def scenes(run, seeds, web, dropout=0.0):
    """Toy-world scenes of seeds -> (x0 (B, 3, H, W) in model space, captions: exact, or (web) the pretraining
    alt-text drawn from Random(seed), a fraction `dropout` of them "" for CFG)."""
    images, caps = [], []
    for s in seeds:
        image, cap = toyworld.sample_scene(s)
        rng = random.Random(s)
        if web:
            cap = toyworld.alt_text(toyworld.parse(cap), rng)[0]
        images.append(image)
        caps.append("" if web and rng.random() < dropout else cap)
    return torch.stack(images).to(run.device) * 2 - 1, caps  # model space: [-1, 1]


def replay(run, it, micro):
    """This rank's share of the `replay` pretraining scenes of step it (alt-text captions, their own t and noise, one
    generator per scene: any split over ranks and micro-steps draws the same): the anchor against training on the
    model's own samples -> dict(x0, t, eps, prompts)."""
    n = run.cfg.replay // (run.world * run.cfg.grad_accum)
    idx = range((micro * run.world + run.rank) * n, (micro * run.world + run.rank + 1) * n)
    x0, caps = scenes(run, [run.seed_for("replay", it, i) for i in idx], web=True)
    t, eps, _ = noise_per_item(run, "replay noise", it, idx, x0.shape[1:])
    return dict(x0=x0, t=t, eps=eps, prompts=caps)


def noise_per_item(run, purpose, it, items, shape):
    """A training timestep and a noise for each item (its index in step it), each from a generator of its own,
    seed_for(purpose, it, item): any split over ranks and micro-steps draws the same -> (t (K,), eps (K, *shape), the
    generators)."""
    gens = [torch.Generator().manual_seed(run.seed_for(purpose, it, g)) for g in items]
    t = torch.cat([S.train_timesteps(run.pipe, 1, g) for g in gens] or [S.train_timesteps(run.pipe, 0, None)])
    eps = S.randn(shape, gens, run.device) if gens else torch.zeros((0, *shape), device=run.device)
    return t.to(run.device), eps, gens


def denoising_sum(run, d, net, cond=None):
    """Sum over d's images (x0, t, eps, prompts) of the plain denoising loss, each the mean over its pixels (cond:
    the prompts' encoding, if not the frozen text encoder's)."""
    x_t = S.add_noise(run.pipe, d["x0"], d["t"], d["eps"])
    cond = M.encode(run.pipe, d["prompts"]) if cond is None else cond
    out = M.unet_call(run.pipe, net, x_t, d["t"], cond).float()
    return (out - S.training_target(run.pipe, x_t, d["x0"], d["t"])[0].float()).pow(2).flatten(1).mean(1).sum()


def renders(run, prompts, gidx):
    """Algorithm 1's dataset images of prompts (global indices gidx), in the model's clean space: toy-world renders."""
    images = [toyworld.render(toyworld.parse(p), np.random.default_rng(run.seed_for("render", g)))[0]
              for p, g in zip(prompts, gidx)]
    return M.from_images(run.pipe, torch.stack([torch.from_numpy(i) for i in images]))


def own_samples(run, cond, gidx):
    """Algorithm 2's images: the current model's own samples of the prompts of cond (B, L, E) (no dataset)."""
    gens = [torch.Generator().manual_seed(run.seed_for("sample", g)) for g in gidx]
    return S.rollout(run.pipe, S.randn(run.pipe.latent_shape, gens, run.device), run.ts, cond, run.uncond,
                     run.cfg.guidance, run.cfg.eta, gens, record=False)


def noised(run, x0, gidx, n, offset=0):
    """Each prompt's image x0 (P, C, H, W) noised to the start step drawn per prompt, n times with the noises
    seed_for("noise", g, offset + j): -> (x_t (P*n, C, H, W), start steps (P,), the noise eps0, its generators, x0
    repeated n times)."""
    ks = start_steps(gidx, run.k_range, run.cfg.seed)  # the noise level per prompt; its n trajectories share it
    gens = [torch.Generator().manual_seed(run.seed_for("noise", g, offset + j)) for g in gidx for j in range(n)]
    eps0 = S.randn(run.pipe.latent_shape, gens, run.device)  # (P*n, C, H, W): the noise that reaches x_t
    t0, x0n = run.ts[torch.tensor(ks, device=run.ts.device)].repeat_interleave(n, 0), x0.repeat_interleave(n, 0)
    return S.add_noise(run.pipe, x0n, t0, eps0), ks, eps0, gens, x0n


def roll(run, prompts, gidx, cond, x0):
    """Algorithms 1 and 2 up to the rewards, without a graph: each prompt's image x0 is noised to its start step;
    n_traj trajectories from there roll m_steps DDIM steps; the x0 prediction of every step is scored (score_steps
    last: of the last one). -> dict with the per-step rewards r (P, n, m or 1) (a failed score is NaN: it drops out
    of selection), traj, and what recompute needs."""
    c, n, m = run.cfg, run.cfg.n_traj, run.cfg.m_steps
    x_t, ks, eps0, gens, x0n = noised(run, x0, gidx, n)
    tsn = torch.stack([run.ts[k:k + m + 1] for k in ks]).repeat_interleave(n, 0)  # (P*n, m+1)
    condn = cond.repeat_interleave(n, 0)
    traj = S.rollout(run.pipe, x_t, tsn, condn, run.uncond, c.guidance, c.eta, gens)
    scored = traj.x0_pred if c.score_steps == "all" else traj.x0_pred[:, -1:]  # (P*n, m or 1, C, H, W)
    with run.timed("decode"):  # without a graph (latent models: the VAE)
        images = M.to_images(run.pipe, scored.flatten(0, 1))
    r = run.score(images, [p for p in prompts for _ in range(n * scored.shape[1])])
    r = r.to(run.device).view(len(gidx), n, scored.shape[1])
    last = r[:, :, -1]
    info = dict(reward=last.nanmean().item(), reward_std=last[last.isfinite()].std().nan_to_num(0).item(),
                failed=(~r.isfinite()).float().mean().item())
    return dict(r=r, traj=traj, x_t=x_t, tsn=tsn, condn=condn, gens=gens, eps0=eps0, x0n=x0n, ks=ks, info=info)


def finals(run, b):
    """Each trajectory of roll's b sampled on from its last state to the end of the schedule, without a graph:
    its own final image (P*n, C, H, W), which depends on what the trajectory did (counted, as every pass)."""
    c, n, x = run.cfg, run.cfg.n_traj, b["traj"].x_final.clone()
    for k in sorted(set(b["ks"])):  # the rows that start at step k share the rest of the schedule
        rows = [p * n + j for p, kk in enumerate(b["ks"]) if kk == k for j in range(n)]
        x[rows] = S.rollout(run.pipe, x[rows], run.ts[k + c.m_steps:], b["condn"][rows], run.uncond, c.guidance,
                            c.eta, [b["gens"][i] for i in rows], record=False)
    return x


def recompute(run, b, rows, net):
    """Model output with grad (where enabled) for the trajectories `rows` (K,) of roll's b at their m states:
    (K, m, C, H, W), in fp32 whatever the autocast dtype. chain_grad: the chain re-rolled from x_t through the same
    guided DDIM steps, with grad through it (the official code); else one pass per recorded state."""
    if run.cfg.chain_grad:
        tr = S.rollout(run.pipe, b["x_t"][rows], b["tsn"][rows], b["condn"][rows], run.uncond, run.cfg.guidance,
                       run.cfg.eta, [b["gens"][i] for i in rows.tolist()], grad=True, unet=net)
        return tr.model_out.float()
    traj, m = b["traj"], run.cfg.m_steps
    out = M.unet_call(run.pipe, net, traj.x[rows].flatten(0, 1), traj.t[rows].flatten(),
                      b["condn"][rows].repeat_interleave(m, 0)).float()
    return out.view(len(rows), m, *out.shape[1:])


def scored_samples(run, prompts, seeds, eta=0.0, net=None):
    """The current model's (or net's) samples of prompts from seeds, recorded, and their rewards (counted)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    traj = S.rollout(run.pipe, S.randn(run.pipe.latent_shape, gens, run.device), run.ts, M.encode(run.pipe, prompts),
                     run.uncond, run.cfg.guidance, eta, gens, unet=net)
    with run.timed("decode"):
        images = M.to_images(run.pipe, traj.x_final)
    return traj, run.score(images, prompts)

