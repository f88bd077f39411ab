"""
What Diffusion-Sharpening is compared with, behind rollout.py's method contract (prepare(run, it, micro) -> batch,
loss(run, batch) -> (loss, info)), and the pretraining of the built-in toy models:

    scenes (pretrain, continued, sft)  the plain denoising loss on toy-world scenes at uniform t
    raft           best-of-N distillation (Dong et al. 2023, arXiv 2304.06767): rounds of the model's own samples,
                   the best by the reward trained on with the plain loss
    diffusion_dpo  Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908) on an offline pool of the base's pairs
    ddpo           DDPO (Black et al. 2023, arXiv 2305.13301): PPO-clip on per-step DDIM log-probabilities
    diffusion_nft  DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): the old policy's own clean samples, trained
                   on with a reward-weighted pair of implicit policies, positive and negative; no likelihoods

diffusion_dpo's loss is sharpen.rlhf_loss with no reward gap; ddpo's and diffusion_nft's equations are below.
"""
import contextlib
import random

import torch
from tqdm import tqdm

import rollout as R
import models as M
import sample as S
import sharpen

# -----------------------------------------------------------------------------
# ddpo's equations


def group_advantages(rewards, eps=1e-4, clip=5.0, std=None):
    """DDPO's per-prompt advantage: A_pj = (r_pj - mean_j r_pj) / (std_j r_pj + eps), clipped to
    [-clip, clip]: (P, n) -> (P, n). NaN (a failed score) gets advantage 0 and stays out of the stats. std: one
    number for every prompt instead (Flow-GRPO's and DiffusionNFT's global_std: the step's, step_std)."""
    ok = rewards.isfinite()
    cnt = ok.sum(1, keepdim=True).clamp_min(1)
    mu = torch.where(ok, rewards, 0).sum(1, keepdim=True) / cnt
    if std is None:
        std = (torch.where(ok, (rewards - mu) ** 2, 0).sum(1, keepdim=True) / (cnt - 1).clamp_min(1)).sqrt()
    return torch.where(ok, (rewards - mu) / (std + eps), 0.0).clamp(-clip, clip)


def step_std(run, rewards):
    """The std (ddof 0, as numpy's) of every finite reward in `rewards` (this rank's tensors) and in the other
    ranks' at the same call: a collective that every rank issues."""
    r = torch.cat([x.flatten().double() for x in rewards])
    r = r[r.isfinite()]
    sums = torch.tensor([r.sum(), r.pow(2).sum(), len(r)], dtype=torch.float64)
    if run.world > 1:
        torch.distributed.all_reduce(sums)
    N = max(sums[2].item(), 1)
    return max(sums[1].item() / N - (sums[0].item() / N) ** 2, 0) ** 0.5


def gaussian_kl(mean, mean_ref, sigma):
    """KL(N(mean, sigma^2) || N(mean_ref, sigma^2)) of a stochastic sampler step, per pixel, averaged over pixels:
    |mean - mean_ref|^2 / (2 sigma^2) -> (B,). (Flow-GRPO's code divides by its g^2 without the step's -dt.)"""
    return ((mean - mean_ref) ** 2 / (2 * sigma ** 2)).flatten(1).mean(1)


def ppo_clip_loss(logp, logp_old, adv, clip):
    """PPO's clipped surrogate (arXiv 1707.06347) as DDPO uses it, per (trajectory, step):
        L = mean max(-A * rho, -A * clamp(rho, 1 - clip, 1 + clip)),   rho = exp(logp - logp_old)
    logp (N,) with grad, logp_old and adv (N,) constants. Returns (loss, fraction of clipped ratios)."""
    ratio = (logp - logp_old.detach()).exp()
    adv = adv.detach()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    return loss, ((ratio - 1).abs() > clip).float().mean()


def nft_optimality(rewards, prompt_of, std, clip=5.0, eps=1e-4):
    """DiffusionNFT's optimality probability r in [0, 1] of each sample (NVlabs/DiffusionNFT, global_std):
        A = (r_i - mean of its prompt's rewards) / (std + eps),   r = clamp(clamp(A, -clip, clip) / clip / 2 + 1/2, 0, 1)
    rewards (N,) finite, prompt_of (N,) a group id per sample, std: of the whole step's rewards (step_std)."""
    groups, inv = torch.unique(prompt_of, return_inverse=True)
    mean = torch.zeros(len(groups), dtype=rewards.dtype).index_add_(0, inv, rewards) / torch.bincount(inv)
    adv = ((rewards - mean[inv]) / (std + eps)).clamp(-clip, clip)
    return (adv / clip / 2 + 0.5).clamp(0, 1)


def nft_loss(x0_theta, x0_old, x0, r, beta, clip=5.0):
    """DiffusionNFT's policy loss per sample (Eq. 8 of arXiv 2509.16117 as train_nft_sd3.py computes it, in x0 space):
        x0+ = beta * x0_theta + (1 - beta) * x0_old,   x0- = (1 + beta) * x0_old - beta * x0_theta
        L = clip * (r * |x0+ - x0|^2 / w+  +  (1 - r) * |x0- - x0|^2 / w-) / beta,   w = sg(mean |x0+- - x0|) >= 1e-5
    |.|^2 and |.| are means over pixels; x0_theta, x0_old: the trained and the old policy's x0 predictions at one
    x_t; x0: the clean sample it was noised from. At fixed t the x0 prediction is affine in the model output with
    weights that sum to one, so mixing outputs (the paper's v+ = (1 - beta) v_old + beta v_theta) is mixing x0
    predictions: the same loss for eps-, v- and flow models. -> (N,)"""
    pos, neg = beta * x0_theta + (1 - beta) * x0_old, (1 + beta) * x0_old - beta * x0_theta
    w_pos, w_neg = ((x.detach() - x0).abs().flatten(1).mean(1).clamp_min(1e-5) for x in (pos, neg))
    err = lambda x: (x - x0).pow(2).flatten(1).mean(1)  # noqa: E731
    return clip * (r * err(pos) / w_pos + (1 - r) * err(neg) / w_neg) / beta


def config_errors(c, per_step, world):
    """train.py's checks of the options these methods own (c: the run's config; per_step prompts, over world ranks)
    -> [(bad, one-line message)]."""
    return [
        (c.raft_pool % max(per_step, 1) or c.replay % max(world * c.grad_accum, 1), f"raft_pool={c.raft_pool} must be "
         f"a multiple of prompts_per_step={per_step}, replay={c.replay} of {world} ranks x grad_accum {c.grad_accum}"),
        (c.method != "raft" and (c.raft_pool or c.raft_select != "best"),
         f"raft_pool and raft_select are raft's; {c.method} does not use them"),
        (c.method not in ("raft", "sharpen_sft") and c.replay,
         f"replay is raft's and sharpen_sft's; {c.method} does not use it"),
        (c.method == "ddpo" and c.num_steps < 2, f"ddpo needs num_steps >= 2 (stochastic steps to train), got {c.num_steps}"),
        (c.train_text_encoder and (c.method not in ("sft", "continued", "raft") or c.lora_rank), f"train_text_encoder "
         f"trains under the plain denoising loss (sft, continued, raft) without LoRA, got method={c.method!r} "
         f"lora_rank={c.lora_rank}")]


# -----------------------------------------------------------------------------
# the plain denoising loss: pretrain, continued, sft, and raft's selected samples


def prepare_scenes(run, it, micro):
    """Toy-world scenes at uniform t. pretrain: the pretraining captions (web-like alt-text, toyworld.ALT_TEXT, a
    caption_dropout of them empty for CFG), the text encoder trains too; continued: the same captions, the UNet
    alone (the control for "more training"); sft (the plain fine-tuning baseline): exact captions, the UNet alone,
    at uniform t or (sft_t=sampler) at sharpen_sft's noise levels: its start step k per prompt, + j < m."""
    c, P, first = run.cfg, run.P, (micro * run.world + run.rank) * run.P
    x0, prompts = R.scenes(run, [run.seed_for("scene", it, i) for i in range(first, first + P)],
                         c.method in ("pretrain", "continued"), c.caption_dropout)
    t, eps, gens = R.noise_per_item(run, "t noise", it, range(first, first + P), x0.shape[1:])
    if c.method == "sft" and c.sft_t == "sampler":  # its start step k per prompt, + j < m
        g0, j = run.first_index(it, micro), [int(torch.randint(0, c.m_steps, (1,), generator=g)) for g in gens]
        t = torch.stack([run.ts[k + jj] for k, jj in zip(R.start_steps(range(g0, g0 + P), run.k_range, c.seed), j)])
    return dict(x0=x0, t=t, eps=eps, prompts=prompts, count=P, info={})


def loss_denoising(run, b):
    """The plain denoising loss: b's x0 noised to t with eps, the trained net's output against the exact target
    (pretrain, train_text_encoder: the prompts through the trained text encoder)."""
    return R.denoising_sum(run, b, run.net, run.encode(b["prompts"])) / len(b["t"]), b["info"]


def new_round(run, key):
    """Forget the rounds sampled for earlier steps (ddpo, raft: a round serves the steps that share key[0])."""
    for k in [k for k in run.rounds if k[0] != key[0]]:
        del run.rounds[k]


def raft_round(run, it):
    """Where step it sits in RAFT's rounds -> (round, slice, slices per round): a round's pool is raft_pool train
    prompts (0: one step's), sampled once and visited raft_epochs times, prompts_per_step of them a step (a slice)."""
    slices = max(1, run.cfg.raft_pool // run.cfg.prompts_per_step)
    return it // (slices * run.cfg.raft_epochs), it % slices, slices


def prepare_raft(run, it, micro):
    """RAFT, best-of-N distillation: at the start of a round the current model samples raft_n images of each of its
    pool's train prompts with the evaluation sampler (eta 0, guidance); the best by the reward (raft_select=first:
    candidate 0, the no-selection control of the same pool; failed scores never picked, a prompt with none scored
    drops out) is trained on with the plain denoising loss at uniform t, one slice of prompts_per_step a step,
    raft_epochs passes over the pool. `replay` pretraining scenes a step (the base's data: alt-text captions)
    ride along as the anchor against training on its own samples. count: the prompts kept + the replayed."""
    c = run.cfg
    rnd, sl, slices = raft_round(run, it)
    key = (rnd, micro)
    if key not in run.rounds:
        new_round(run, key)
        run.rounds[key] = [raft_slice(run, rnd * slices + b, micro) for b in range(slices)]
    rd = run.rounds[key][sl]
    K = len(rd["prompts"])
    t, eps, _ = R.noise_per_item(run, "t noise", it, rd["index"], rd["x0"].shape[1:])
    b = dict(x0=rd["x0"], t=t, eps=eps, prompts=rd["prompts"], count=K, info=dict(best_reward=rd["reward"]))
    if c.replay:  # the anchor: pretraining scenes beside the pool's
        rp = R.replay(run, it, micro)
        b = dict(x0=torch.cat([b["x0"], rp["x0"]]), t=torch.cat([b["t"], rp["t"]]), eps=torch.cat([b["eps"], rp["eps"]]),
                 prompts=b["prompts"] + rp["prompts"], count=K + len(rp["t"]), info=dict(b["info"], replay=len(rp["t"])))
    return b


def raft_slice(run, q, micro):
    """Slice q (counted over all rounds) of RAFT's pools on this rank: P prompts x raft_n samples, the selected one
    of each."""
    c, P, N, ar = run.cfg, run.P, run.cfg.raft_n, torch.arange(run.P)
    first = q * c.prompts_per_step + (micro * run.world + run.rank) * P
    prompts = [run.train_prompt(g) for g in range(first, first + P)]
    traj, r = R.scored_samples(run, [p for p in prompts for _ in range(N)],
                               [run.seed_for("noise", g, j) for g in range(first, first + P) for j in range(N)])
    rew = r.to(run.device).view(P, N)
    pick = torch.zeros(P, dtype=torch.long) if c.raft_select == "first" else sharpen.best_worst(rew)[0]
    r_pick = rew[ar, pick]
    live = torch.isfinite(r_pick) | (c.raft_select == "first")  # the control needs no score
    x = traj.x_final.view(P, N, *traj.x_final.shape[1:])[ar, pick]
    kept = live.nonzero().flatten().tolist()
    return dict(x0=x[live], prompts=[prompts[i] for i in kept], index=[first + i for i in kept],
                reward=r_pick.nanmean().item())


# -----------------------------------------------------------------------------
# diffusion_dpo


def pool_pairs(run):
    """Offline preference pairs: dpo_pool train prompts x dpo_k samples of the reference (the base model, also after
    a resume), the best and worst of each prompt (ties dropped): [x_w, x_l, prompts]. Every rank makes the whole
    pool."""
    c = run.cfg
    rng = random.Random(run.seed_for("pool prompts", 0))
    prompts = [run.train_prompt(None, rng) for _ in range(c.dpo_pool)]
    xw, xl, kept = [], [], []
    for i in tqdm(range(0, c.dpo_pool, 32), desc="diffusion_dpo pool", disable=run.quiet):
        ps = prompts[i:i + 32]
        seeds = [run.seed_for("pool", (i + j) * c.dpo_k + k) for j in range(len(ps)) for k in range(c.dpo_k)]
        traj, r = R.scored_samples(run, [p for p in ps for _ in range(c.dpo_k)], seeds, net=run.ref)
        x, r = traj.x_final.view(len(ps), c.dpo_k, *traj.x_final.shape[1:]), r.view(len(ps), c.dpo_k)
        iw, il = sharpen.best_worst(r)
        for j in torch.nonzero(r[torch.arange(len(ps)), iw] > r[torch.arange(len(ps)), il]).flatten():
            xw.append(x[j, iw[j]]), xl.append(x[j, il[j]]), kept.append(ps[j])
    if not kept:  # the same on every rank (each makes the whole pool)
        raise SystemExit(f"error: diffusion_dpo: the {c.dpo_k} samples of every one of the {c.dpo_pool} pool prompts "
                         "tied (or were not scored): no preference pairs; raise dpo_pool or dpo_k, or use a reward "
                         "that separates them")
    if run.master:
        tqdm.write(f"diffusion_dpo pool: {len(kept)} pairs from {c.dpo_pool} prompts x {c.dpo_k} samples")
    return [torch.stack(xw), torch.stack(xl), kept]


def prepare_diffusion_dpo(run, it, micro):
    """This micro-step's pairs of the pool (built at the first step; a resumed run rebuilds the same pool, which its
    checkpoint's counts hold already), cycling through it, noised with one shared t and noise per pair."""
    if not run.pool:
        with contextlib.nullcontext() if it == 0 else run.uncounted():
            run.pool.extend(pool_pairs(run))
    xw, xl, prompts = run.pool
    first, P = run.first_index(it, micro), run.P
    idx = torch.tensor([g % len(prompts) for g in range(first, first + P)])
    t, eps, _ = R.noise_per_item(run, "t noise", it, range(first, first + P), xw.shape[1:])
    t = t.repeat(2)
    x0 = torch.cat([xw[idx], xl[idx]])  # (2P, C, H, W): winners then losers
    x_t = S.add_noise(run.pipe, x0, t, eps.repeat(2, 1, 1, 1))
    return dict(x_t=x_t, t=t, target=S.training_target(run.pipe, x_t, x0, t)[0],
                prompts=[prompts[i] for i in idx.tolist()], count=P, info={})


def loss_diffusion_dpo(run, b):
    """Diffusion-DPO on the pairs: rlhf_loss against the frozen reference with no reward gap."""
    P = b["count"]
    cond = M.encode(run.pipe, b["prompts"]).repeat(2, 1, 1)
    mse = sharpen.row_mse(M.unet_call(run.pipe, run.net, b["x_t"], b["t"], cond).float(), b["target"])
    with torch.no_grad():
        ref = sharpen.row_mse(M.unet_call(run.pipe, run.ref, b["x_t"], b["t"], cond).float(), b["target"])
    zero = torch.zeros(P, device=run.device)
    loss, d = sharpen.rlhf_loss(mse[:P], mse[P:], ref[:P], ref[P:], zero, zero, run.cfg.beta, False)
    return loss, dict(acc=d["implicit_acc"].item())

# -----------------------------------------------------------------------------
# ddpo


def prepare_ddpo(run, it, micro):
    """DDPO: every ppo_epochs steps the current model samples n trajectories per prompt (eta = ddpo_eta; on a flow
    model Flow-GRPO's SDE with noise level ddpo_eta), their per-step log-probabilities recorded; advantages are the
    rewards normalised within each prompt (ddpo_std=step: by the std of the round's rewards over every rank and
    micro-step, set at the last micro-step, as Flow-GRPO); each step trains on ddpo_steps() random timesteps of the
    round, the same for every sample (any rank split trains the same). With ddpo_kl, Flow-GRPO's KL to the base:
    ddpo on a flow model is Flow-GRPO (on a DDIM model, DDPO with its group advantages and that KL)."""
    c, P, n, key = run.cfg, run.P, run.cfg.n_traj, (it // run.cfg.ppo_epochs, micro)
    ts = run.ts
    new = key not in run.rounds
    if new:  # sample a new round with the current (old) policy
        new_round(run, key)
        gidx = list(run.prompt_range(it // c.ppo_epochs, micro))
        prompts = [run.train_prompt(g) for g in gidx for _ in range(n)]
        seeds = [run.seed_for("noise", g, j) for g in gidx for j in range(n)]
        traj, r = R.scored_samples(run, prompts, seeds, c.ddpo_eta)
        x_next = torch.cat([traj.x[:, 1:], traj.x_final[:, None]], 1)  # (B, steps, C, H, W)
        with torch.no_grad():  # the last step lands on x0 with sigma = 0: no density, left out
            lp = torch.stack([S.ddim_logprob(run.pipe, traj.x[:, k], traj.model_out[:, k], ts[k].expand(P * n),
                                             ts[k + 1].expand(P * n), c.ddpo_eta, x_next[:, k])
                              for k in range(c.num_steps - 1)], 1)
        run.rounds[key] = dict(x=traj.x, x_next=x_next, lp=lp, prompts=prompts, reward=r,
                               adv=group_advantages(r.view(P, n)).flatten())
    if new and c.ddpo_std == "step" and micro == c.grad_accum - 1:  # a round starts on every rank at once
        rounds = [run.rounds[(key[0], m)] for m in range(c.grad_accum)]
        std = step_std(run, [rd["reward"] for rd in rounds])
        for rd in rounds:
            rd["adv"] = group_advantages(rd["reward"].view(P, n), std=std).flatten()
    gen = torch.Generator().manual_seed(run.seed_for("ddpo t", it))  # the step's, on every rank and micro-step
    ks = torch.randperm(c.num_steps - 1, generator=gen)[:R.ddpo_steps(c)]
    return dict(round=run.rounds[key], ks=ks.tolist(), count=P, info={})


def loss_ddpo(run, b):
    """PPO-clip on the round's log-probabilities at the step's timesteps, a mean over them; + ddpo_kl times the mean
    gaussian_kl of each step's mean to the base model's (Flow-GRPO's beta)."""
    c, rd, ks, ts = run.cfg, b["round"], b["ks"], run.ts
    B, cond = len(rd["prompts"]), M.encode(run.pipe, rd["prompts"])
    loss = clipped = kl = 0.0
    for k in ks:
        x, t, t_prev = rd["x"][:, k], ts[k].expand(B), ts[k + 1].expand(B)
        out = S.predict(run.pipe, x, ts[k], cond, run.uncond, c.guidance, run.net)
        lp = S.ddim_logprob(run.pipe, x, out, t, t_prev, c.ddpo_eta, rd["x_next"][:, k])
        l_k, c_k = ppo_clip_loss(lp, rd["lp"][:, k], rd["adv"], c.ppo_clip)
        if c.ddpo_kl:
            with torch.no_grad():
                out_ref = S.predict(run.pipe, x, ts[k], cond, run.uncond, c.guidance, run.ref)
            mean, mean_ref = (S.ddim_step(run.pipe, x, o, t, t_prev, c.ddpo_eta, torch.zeros_like(x))[0]
                              for o in (out, out_ref))
            kl_k = gaussian_kl(mean, mean_ref, S.step_std(run.pipe, x, t, t_prev, c.ddpo_eta)).mean()
            l_k, kl = l_k + c.ddpo_kl * kl_k, kl + kl_k.item() / len(ks)
        loss, clipped = loss + l_k / len(ks), clipped + c_k.item() / len(ks)
    return loss, dict(reward=rd["reward"].nanmean().item(), clipfrac=clipped, kl=kl)


# -----------------------------------------------------------------------------
# diffusion_nft


def nft_follow(run, it):
    """The old policy after step it - 1: old <- d * old + (1 - d) * theta, d = min(nft_decay * it, 0.5) (the official
    decay_type 1; nft_decay = 0: the policy that samples is always the current one). Its trained parameters only."""
    d, live = min(run.cfg.nft_decay * it, 0.5), dict(run.pipe.unet.named_parameters())
    with torch.no_grad():
        for name, o in run.old.named_parameters():
            if live[name].requires_grad:
                o.lerp_(live[name].detach(), 1 - d)


def prepare_diffusion_nft(run, it, micro):
    """DiffusionNFT: each step the old policy samples n_traj images of each prompt with the evaluation's ODE sampler
    (eta 0), scored; each sample's optimality r (nft_optimality; the std over the whole step's finite rewards, all
    ranks and micro-steps, set at the last micro-step: a collective every rank issues); the loss trains
    timestep_fraction of the schedule's timesteps of each sample, each at fresh noise. A failed score drops its
    sample. One optimizer step per round, as the official 1 gradient step per epoch."""
    c, n = run.cfg, run.cfg.n_traj
    if micro == 0:  # (train.py has moved the old policy by nft_follow before the step)
        new_round(run, (it, 0))
    gidx = list(run.prompt_range(it, micro))
    prompts = [run.train_prompt(g) for g in gidx for _ in range(n)]
    traj, r = R.scored_samples(run, prompts, [run.seed_for("noise", g, j) for g in gidx for j in range(n)], net=run.old)
    live = r.isfinite()
    rd = run.rounds[(it, micro)] = dict(x0=traj.x_final[live.to(traj.x_final.device)], reward=r[live].double(),
                                        group=torch.tensor(gidx).repeat_interleave(n)[live],
                                        sample=torch.tensor([g * n + j for g in gidx for j in range(n)])[live],
                                        prompts=[p for p, ok in zip(prompts, live.tolist()) if ok])
    if micro == c.grad_accum - 1:  # the step's reward std, every rank
        std = step_std(run, [run.rounds[(it, m)]["reward"] for m in range(c.grad_accum)])
        for m in range(c.grad_accum):
            x = run.rounds[(it, m)]
            x["r"] = nft_optimality(x["reward"], x["group"], std).float().to(run.device) if len(x["reward"]) else None
    info = dict(reward=r.nanmean().item(), failed=(~live).float().mean().item(), kl=float("nan"), r_mean=float("nan"))
    return dict(round=rd, count=int(live.sum()), info=info)


def loss_diffusion_nft(run, b):
    """nft_loss at timestep_fraction of the schedule's steps per sample (its own draw: any rank split trains the
    same), a mean over them and the samples; + nft_kl * |out_theta - out_ref|^2 (the official KL term, in the
    model's output space)."""
    c, rd = run.cfg, b["round"]
    K, T = R.ddpo_steps(c), c.num_steps
    gens = [torch.Generator().manual_seed(run.seed_for("nft t", s)) for s in rd["sample"].tolist()]
    k = torch.stack([torch.randperm(T, generator=g)[:K] for g in gens])  # (N, K): steps of the schedule
    t = run.ts[k.to(run.ts.device)].flatten()
    x0 = rd["x0"].repeat_interleave(K, 0)
    x_t = S.add_noise(run.pipe, x0, t, S.randn(x0.shape[1:], [g for g in gens for _ in range(K)], run.device))
    cond = M.encode(run.pipe, rd["prompts"]).repeat_interleave(K, 0)
    out = M.unet_call(run.pipe, run.net, x_t, t, cond).float()
    with torch.no_grad():
        out_old = M.unet_call(run.pipe, run.old, x_t, t, cond).float()
        out_ref = M.unet_call(run.pipe, run.ref, x_t, t, cond).float() if c.nft_kl else None
    x0_theta, x0_old = (S.split_prediction(run.pipe, x_t, o, t)[0] for o in (out, out_old))
    policy = nft_loss(x0_theta, x0_old, x0, rd["r"].repeat_interleave(K), c.nft_beta).mean()
    kl = (out - out_ref).pow(2).mean() if c.nft_kl else torch.zeros((), device=out.device)
    return policy + c.nft_kl * kl, dict(b["info"], kl=kl.item(), r_mean=rd["r"].mean().item())
