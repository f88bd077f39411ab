"""
Inference-time search: what Diffusion-Sharpening competes with. Each method spends more UNet passes
(NFE) per image, with the reward as verifier, instead of training; each returns the NFE it spent.

    best_of_n      N full samples from N seeds, keep the best (N=1 is plain sampling)
    noise_search   zero-order search over the initial noise (Ma et al. 2025, arXiv 2501.09732): a pivot
                   noise, K neighbours per round on the sphere around it, move to the best, R rounds
    greedy_search  per-step search in the spirit of Demon (Yeh et al. 2024, arXiv 2410.05760): at every
                   step branch K stochastic DDIM steps, keep the one whose next x0 prediction scores best

All three take the same (prompt, seed) pairs as sample.sample and are deterministic in them.
"""
import torch

import sample as S


def _noise(pipe, seed, j):
    """Candidate j's initial noise for a (prompt, seed) pair; candidate 0 is sample.sample's own."""
    C, H = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.randn((C, H, H), generator=torch.Generator().manual_seed(int(seed) + 1_000_003 * j))


def _final(pipe, noises, prompts, ts, guidance, eta, seeds):
    """Full DDIM samples from given noises (B,C,H,W) -> images in [0,1]."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    for g in gens:  # advance past the initial draw, as sample.sample's generators are (eta > 0 steps)
        torch.randn(noises.shape[1:], generator=g)
    x = S.rollout(pipe, noises.to(pipe.device), ts, S.encode(pipe, prompts), S.encode(pipe, [""]),
                  guidance, eta, gens, record=False)
    return S.to_images(pipe, x)


def nfe_per_call(guidance):
    """UNet passes per image per step: classifier-free guidance doubles the batch."""
    return 1 + (guidance != 1.0)


@torch.no_grad()
def best_of_n(pipe, prompts, seeds, reward_fn, N, num_steps=20, guidance=1.0, eta=0.0):
    """-> (images (B,3,H,W), nfe per image, info with the chosen candidate and all rewards (B, N))."""
    ts, B = S.timesteps(pipe, num_steps), len(prompts)
    best, rewards = None, []
    for j in range(N):  # one candidate of every prompt per batch: memory stays that of plain sampling
        noises = torch.stack([_noise(pipe, s, j) for s in seeds])
        images = _final(pipe, noises, prompts, ts, guidance, eta, [int(s) + 1_000_003 * j for s in seeds])
        r = reward_fn(images, prompts)[0].float().nan_to_num(-float("inf"))  # a failed score never wins
        if best is None:
            best, best_r, idx = images, r, torch.zeros(B, dtype=torch.long)
        else:
            better = r > best_r  # ties keep the earlier candidate
            best = torch.where(better.view(-1, 1, 1, 1), images, best)
            best_r, idx = torch.where(better, r, best_r), torch.where(better, j, idx)
        rewards.append(r)
    return best, N * num_steps * nfe_per_call(guidance), dict(choice=idx, rewards=torch.stack(rewards, 1))


@torch.no_grad()
def noise_search(pipe, prompts, seeds, reward_fn, rounds, K, radius=0.5, num_steps=20, guidance=1.0):
    """Zero-order search: neighbour = (pivot + radius * z) / sqrt(1 + radius^2), still N(0, I) marginally.
    NFE per image = (1 + rounds * K) * num_steps (* 2 with guidance)."""
    ts = S.timesteps(pipe, num_steps)
    pivot = torch.stack([_noise(pipe, s, 0) for s in seeds])
    best = _final(pipe, pivot, prompts, ts, guidance, 0.0, seeds)
    best_r = reward_fn(best, prompts)[0].float().nan_to_num(-float("inf"))
    for rnd in range(rounds):
        cand_noise, cand_img, cand_r = [], [], []
        for k in range(K):
            z = torch.stack([_noise(pipe, s, 1 + rnd * K + k) for s in seeds])
            noise = (pivot + radius * z) / (1 + radius ** 2) ** 0.5
            images = _final(pipe, noise, prompts, ts, guidance, 0.0, seeds)
            cand_noise.append(noise), cand_img.append(images)
            cand_r.append(reward_fn(images, prompts)[0].float().nan_to_num(-float("inf")))
        r, k = torch.stack(cand_r, 1).max(1)  # the best neighbour of each prompt
        better = r > best_r  # move only when it improves: the pivot's own score is kept
        ar = torch.arange(len(prompts))
        pivot = torch.where(better.view(-1, 1, 1, 1), torch.stack(cand_noise, 1)[ar, k], pivot)
        best = torch.where(better.view(-1, 1, 1, 1), torch.stack(cand_img, 1)[ar, k], best)
        best_r = torch.where(better, r, best_r)
    return best, (1 + rounds * K) * num_steps * nfe_per_call(guidance), dict(rewards=best_r)


@torch.no_grad()
def greedy_search(pipe, prompts, seeds, reward_fn, K, num_steps=20, guidance=1.0, eta=1.0):
    """At each step, K stochastic DDIM steps (eta > 0) branch from the kept state; each branch's x0
    prediction at its new state (one UNet pass, reused by the next step) is scored; the best is kept.
    NFE per image = (1 + (num_steps - 1) * K) * (1 or 2): the last step lands on the clean image."""
    ts, B = S.timesteps(pipe, num_steps), len(prompts)
    cond, uncond = S.encode(pipe, prompts), S.encode(pipe, [""])
    x = torch.stack([_noise(pipe, s, 0) for s in seeds]).to(pipe.device)
    out = S.predict(pipe, x, ts[0], cond, uncond, guidance)
    gens = [torch.Generator().manual_seed(int(s) + 7) for s in seeds for _ in range(K)]
    ar = torch.arange(B)
    for i in range(num_steps - 1):
        t, t_prev = ts[i], ts[i + 1]
        xs = x.repeat_interleave(K, 0)  # (B*K, C, H, W): K branches per prompt
        noise = S.randn(x.shape[1:], gens, x.device)
        x_new, _, _ = S.ddim_step(pipe, xs, out.repeat_interleave(K, 0), t.expand(B * K), t_prev.expand(B * K), eta, noise)
        out_new = S.predict(pipe, x_new, t_prev, cond.repeat_interleave(K, 0), uncond, guidance)
        _, x0, _ = S.ddim_step(pipe, x_new, out_new, t_prev.expand(B * K), ts[-1].expand(B * K))  # x0 prediction
        r = reward_fn(S.to_images(pipe, x0), [p for p in prompts for _ in range(K)])[0].float()
        k = r.nan_to_num(-float("inf")).view(B, K).argmax(1)  # ties: the first branch
        x, out = x_new.view(B, K, *x.shape[1:])[ar, k], out_new.view(B, K, *out.shape[1:])[ar, k]
    x, _, _ = S.ddim_step(pipe, x, out, ts[-2].expand(B), ts[-1].expand(B))
    return S.to_images(pipe, x), (1 + (num_steps - 1) * K) * nfe_per_call(guidance), {}
