"""
Diffusion-Sharpening (Tian et al., ICML 2025, arXiv 2502.12146): rewards -> path-integral weights -> losses.

Per prompt c, n trajectories tau_1..tau_n leave the same noise level, each rolled m DDIM steps;
r_jk is the reward of trajectory j's x0 prediction at step k, e_jk its per-pixel denoising error.
    R_j    = sum_k r_jk                                        path integral (Eq. 8)
    w_j    = exp(R_j / lam) / sum_i exp(R_i / lam)            lam -> 0: argmax (the paper), lam -> inf: 1/n
    L_SFT  = E_c sum_j w_j * 1/m sum_k e_jk                    weighted denoising loss (Eq. 9)
    L_RLHF = -E_c log sigma(-beta/2 [(e_w - e_l) - (e_w^ref - e_l^ref)] - (R_w - R_l))     (Eq. 11)
with e_j = 1/m sum_k e_jk and w, l = argmax, argmin of R: Diffusion-DPO (arXiv 2311.12908) between a
prompt's best and worst trajectory. Rewards and weights are constants: everything here detaches them.
sft_weights=step takes Eq. 9's softmax over every trajectory of the optimizer step instead of each prompt's:
w_pj = exp(R_pj / lam) / sum_{p'j'} exp(R_p'j' / lam), so that a reward can weigh prompts (data pairs) too.

Provenance: semantics checked against Gen-Verse/Diffusion-Sharpening train_{sft,rlhf}_diffusion_sharpen_sdxl.py
and Diffusion-DPO's train.py (differences noted where they matter); no code copied.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

import rollout as R
import models as M
import sample as S
from kernels import row_mse, weighted_mse

AGGREGATES = ("sum", "mean", "last")

# -----------------------------------------------------------------------------
# rewards -> weights


def trajectory_rewards(per_step, agg="sum"):
    """R_j from the per-step rewards r_jk: (P, n, m) -> (P, n).
    "sum": R_j = sum_k r_jk, the path integral of Eq. 8. "mean": R_j / m, the same ranking (the
    official code's choice; use it when lam should not scale with m). "last": r_jm, the final-step
    (outcome) reward only, an ablation that ignores the path."""
    if agg in ("sum", "mean"):
        return reduce(per_step, "p n m -> p n", agg)
    if agg == "last":
        return per_step[:, :, -1]
    raise ValueError(f"unknown agg {agg!r}; expected one of {AGGREGATES}")


@torch.no_grad()
def trajectory_weights(rewards, lam, normalize=False, eps=1e-6):
    """w_pj = softmax_j(R_pj / lam), one softmax per prompt row: (P, n) -> (P, n), detached, rows sum to 1.
    lam = 0 is exactly the one-hot at argmax_j R_pj (ties -> the lowest index), the paper's selection;
    lam = inf is exactly 1/n (plain fine-tuning on all trajectories); lam < 0 is an error.
    normalize=True first z-scores each row, R <- (R - mean) / max(std, eps) (a row with std <= eps
    becomes zeros), so lam is in units of the row's spread and w is invariant to R -> a*R + b, a > 0.
    Non-finite rewards (a grader that failed) get weight 0; a row with none finite is all zeros."""
    lam = float(lam)
    if not lam >= 0:  # also rejects NaN
        raise ValueError(f"lam must be >= 0 (0: argmax, inf: uniform), got {lam}")
    R = rewards.detach()
    R = R if R.is_floating_point() else R.float()  # (P, n)
    ok = torch.isfinite(R)  # a failed score (NaN) drops its trajectory: weight 0, left out of mean/std
    cnt = ok.sum(dim=1, keepdim=True)
    if normalize:
        mu = torch.where(ok, R, 0).sum(dim=1, keepdim=True) / cnt.clamp_min(1)
        std = (torch.where(ok, (R - mu) ** 2, 0).sum(dim=1, keepdim=True) / cnt.clamp_min(1)).sqrt()
        R = torch.where(std > eps, (R - mu) / std.clamp_min(eps), torch.zeros_like(R))
    R = torch.where(ok, R, -math.inf)
    if lam == 0:  # torch.argmax: first max on ties; a row with no score left gets no weight
        return F.one_hot(R.argmax(dim=1), R.shape[1]).to(R.dtype) * (cnt > 0)
    if math.isinf(lam):
        return ok.to(R.dtype) / cnt.clamp_min(1)
    return torch.softmax(R / lam, dim=1).nan_to_num(0.0)


@torch.no_grad()
def step_weights(rewards, lam, top):
    """Path-integral weights across prompts (sft_weights=step): u_pj = exp((R_pj - top) / lam), (P, n) -> (P, n) in
    float64, unnormalised; the method divides by their sum over every trajectory of the optimizer step (all prompts,
    micro-steps and ranks: train.py's count), so that w = softmax(R / lam) over the whole step. top (the path
    reward's largest value) is a constant that cancels there and keeps exp in range. lam = inf: u = 1 (uniform
    over the step); 0 < lam required. Non-finite rewards get weight 0."""
    lam = float(lam)
    if not lam > 0:
        raise ValueError(f"lam must be > 0 for weights across a step (0 would keep one trajectory), got {lam}")
    R = rewards.detach().double()
    u = torch.ones_like(R) if math.isinf(lam) else torch.exp((R - top) / lam)
    return torch.where(torch.isfinite(R), u, torch.zeros_like(u))


def select_rows(weights):
    """(p_idx, n_idx), each (K,) long: the trajectories with w > 0, the only ones sft_loss needs.
    Use it to recompute the model output with grad only there: pred = model(x[p_idx, n_idx]) (K, m, ...),
    then sft_loss(pred, target[p_idx, n_idx], weights, rows=(p_idx, n_idx)). lam = 0 keeps one
    trajectory per prompt (n times fewer forwards); softmax weights are positive, so lam > 0 keeps all."""
    return torch.nonzero(weights > 0, as_tuple=True)


def best_worst(R):
    """(idx_w, idx_l), each (P,) long: argmax_j and argmin_j of R (P, n) per prompt.
    Ties: the winner takes the lowest index, the loser the highest, so idx_w != idx_l for n >= 2
    (a constant row gives (0, n-1) and a zero reward gap). Non-finite rewards are never picked while a
    finite one is left; a row with fewer than two finite rewards has R_w > R_l false: skip it."""
    n = R.shape[1]
    if n < 2:
        raise ValueError(f"best_worst needs n >= 2 trajectories per prompt, got R of shape {tuple(R.shape)}")
    ok = torch.isfinite(R)
    hi, lo = torch.where(ok, R, -math.inf), torch.where(ok, R, math.inf)
    return hi.argmax(dim=1), n - 1 - lo.flip(1).argmin(dim=1)

# -----------------------------------------------------------------------------
# weighted losses


def sft_loss(pred, target, weights, rows=None, use_triton=None):
    """Eq. 9, the path-integral-weighted denoising loss, normalised as a mean over prompts and steps:
        L = 1/P sum_p sum_j w_pj * 1/m sum_k mean_d (pred_pjkd - target_pjkd)^2
    so with rows of w summing to 1 it is a plain MSE (lam = 0: that of each prompt's best trajectory).
    weights (P, n) is always the full matrix (it fixes P) and is detached here. Two contracts for pred:
      rows=None:              pred, target (P, n, m, ...) for every trajectory;
      rows=(p_idx, n_idx):    pred, target (K, m, ...) for those K trajectories only (see select_rows);
                              the trajectories left out count as weight 0, so keep every one with w > 0.
    target is the exact per-step target of pred (eps or v, from the sampler). Computed as one
    kernels.weighted_mse over the K*m step rows, row (k, step) weighted w_k / (P * m)."""
    P, n = weights.shape
    w = weights.detach()
    if rows is None:
        if pred.shape[:2] != (P, n):
            raise ValueError(f"pred {tuple(pred.shape)} must be (P, n, m, ...) = ({P}, {n}, m, ...) "
                             "when rows=None")
        pred, target, w = pred.flatten(0, 1), target.flatten(0, 1), w.flatten()  # (P*n, m, ...)
    else:
        w = w[rows]  # (K,)
    if pred.dim() < 3 or pred.shape[0] != w.shape[0]:
        raise ValueError(f"pred {tuple(pred.shape)} must be (K, m, ...) with K = {w.shape[0]} weights")
    m = pred.shape[1]
    w_step = repeat(w / (P * m), "k -> (k m)", m=m)  # (K*m,)
    return weighted_mse(rearrange(pred, "k m ... -> (k m) ..."), rearrange(target, "k m ... -> (k m) ..."),
                        w_step, use_triton=use_triton)


def trajectory_mse(pred, target, use_triton=None):
    """e_j = 1/m sum_k mean_d (pred_jkd - target_jkd)^2, one number per trajectory: (K, m, ...) -> (K,).
    The per-pair error rlhf_loss compares (for the model with grad, for the reference under no_grad)."""
    return row_mse(rearrange(pred, "k m ... -> k (m ...)"), rearrange(target, "k m ... -> k (m ...)"),
                   use_triton=use_triton)


def official_eps_target(eps0, m):
    """The official code's approximation: the first step's noise eps0 (K, ...) reused as the target of all
    m steps -> (K, m, ...). Exact only at k = 0: later x_{t_k} come from the model's own DDIM steps, not
    from add_noise(x0, eps0, t_k). For ablations; the sampler's exact targets are the default."""
    return repeat(eps0, "k ... -> k m ...", m=m)


def rlhf_loss(mse_w, mse_l, ref_mse_w, ref_mse_l, R_w, R_l, beta, reward_in_sigmoid=True):
    """Eq. 11, Diffusion-DPO between each prompt's best (w) and worst (l) trajectory; all inputs (P,),
    the mse's per trajectory averaged over steps and pixels (trajectory_mse), ref_* and R_* detached here:
        h_p     = -beta/2 * [(mse_w - mse_l) - (ref_mse_w - ref_mse_l)]      Diffusion-DPO's inside term
        Delta_p = R_w - R_l >= 0                                             the pair's reward gap
        reward_in_sigmoid=True  (the paper):         L = mean_p -log sigma(h_p - Delta_p)
        reward_in_sigmoid=False (the official code): L = mean_p -log sigma(h_p) + mean_p Delta_p
    Inside (the REBEL-style modulation the paper cites), Delta is a margin the model's implicit reward
    h must exceed: dL/dh = -sigma(Delta - h), so a pair the reward separates more gets a larger push;
    at h = 0 the loss is -log sigma(-Delta) = log(1 + e^Delta), growing with Delta. Delta has R's scale:
    with rewards in [0, 1] per step, agg="sum" makes it 0..m, agg="mean" 0..1 (train.py's agg).
    The official code adds the gap outside the log-sigmoid, where R is a constant: its gradient is
    exactly Diffusion-DPO's and only the logged value shifts.
    Their beta_dpo has no 1/2 (logits = beta_dpo * (ref_diff - model_diff)): beta here = 2 * beta_dpo.
    Returns (loss, info); info holds detached 0-dim tensors: implicit_acc = fraction of pairs with h > 0
    (as Diffusion-DPO, without Delta, so it tracks the model and not the reward), inside = mean argument
    of the log-sigmoid, reward_gap = mean Delta."""
    ref_diff = (ref_mse_w - ref_mse_l).detach()
    gap = (R_w - R_l).detach().float()  # (P,)
    h = -0.5 * beta * ((mse_w - mse_l) - ref_diff)  # (P,)
    inside = h - gap if reward_in_sigmoid else h
    loss = reduce(-F.logsigmoid(inside), "p -> ", "mean")
    if not reward_in_sigmoid:
        loss = loss + reduce(gap, "p -> ", "mean")  # a constant: the official code's placement
    info = {"implicit_acc": (h.detach() > 0).float().mean(), "inside": inside.detach().mean(),
            "reward_gap": gap.mean()}
    return loss, info


# -----------------------------------------------------------------------------
# the paper's two methods, behind rollout.py's contract: prepare(run, it, micro) -> batch, loss(run, batch)

def config_errors(c):
    """train.py's checks of the options these two methods own (c: the run's config) -> [(bad, one-line message)]."""
    return [
        (c.method == "sharpen_rlhf" and c.n_traj < 2,
         f"sharpen_rlhf needs n_traj >= 2 (a best and a worst trajectory), got {c.n_traj}"),
        (c.method != "sharpen_sft" and (c.lam != 0 or c.normalize or (c.sft_data, c.sft_weights) != ("render", "prompt")
                                        or c.sft_target == "final"),  # an ablation that silently changed nothing
         f"lam, normalize, sft_data, sft_weights, sft_target=final are sharpen_sft's (Eq. 9's weights, its data); "
         f"{c.method} does not use them (sharpen_rlhf trains each prompt's best vs worst trajectory, Eq. 11)"),
        (c.sft_weights == "step" and (c.lam == 0 or c.normalize), f"sft_weights=step needs 0 < lam (0 keeps one "
         f"trajectory of the whole step) and no normalize, got lam={c.lam} normalize={c.normalize}"),
        (c.method == "sharpen_rlhf" and c.sft_target == "official" and c.dpo_target != "start",
         "--sft_target=official reuses the first noise, aimed at the sample that was noised: with sharpen_rlhf it "
         "needs --dpo_target=start (the outcome targets are exact by construction)")]


def rolled(run, gidx):
    """Algorithms 1 and 2 up to the trajectory rewards for the prompts of global indices gidx: each prompt's image
    (Alg. 1, sharpen_sft: a dataset render, or sft_data=alttext a pretraining scene with its alt-text caption as the
    prompt; Alg. 2, sharpen_rlhf: the model's own sample) is noised to a start step drawn per prompt, and n
    trajectories roll m scored steps from there (rollout.roll). Adds R (P, n) (Eq. 8) and the exact per-step targets
    (P*n, m, C, H, W): towards the image that was noised, or (sharpen_rlhf, dpo_target=outcome) each trajectory's own
    last x0 prediction, so winner and loser differ in it, or (sharpen_sft, sft_target=final) each trajectory's own
    final image, sampled on to the end: then what the selection picks is what is learned."""
    c, sft = run.cfg, run.cfg.method == "sharpen_sft"
    alttext = sft and c.sft_data == "alttext"  # the pretraining pairs: scenes with their web-like, often wrong captions
    if alttext:
        x0, prompts = R.scenes(run, [run.seed_for("alttext", g) for g in gidx], web=True)
    else:
        prompts = [run.train_prompt(g) for g in gidx]
    cond = M.encode(run.pipe, prompts)  # (P, L, E), shared by the prompt's n trajectories
    if not alttext:
        x0 = R.renders(run, prompts, gidx) if sft else R.own_samples(run, cond, gidx)
    b = R.roll(run, prompts, gidx, cond, x0)
    traj, outcome = b["traj"], c.method == "sharpen_rlhf" and c.dpo_target == "outcome"
    aim = traj.x0_pred[:, -1] if outcome else R.finals(run, b) if c.sft_target == "final" else b["x0n"]
    target = S.state_targets(run.pipe, traj, aim)[0]
    if c.sft_target == "official":
        target = S.param_target(run.pipe, official_eps_target(b["eps0"], c.m_steps).flatten(0, 1),
                                b["x0n"].repeat_interleave(c.m_steps, 0), traj.t.flatten()).view_as(target)
    return dict(b, R=trajectory_rewards(b["r"], c.agg), target=target)


def exact_target_warning(run):
    """A warning (or "") where sharpen_sft's rolled states reach so little noise that the exact target towards the
    render, eps = (x_t - a x0) / s (flow: v, the same), grows as 1/s: x_t is off the line to x0 after a step."""
    c = run.cfg
    if c.m_steps == 1 or c.sft_target != "exact":
        return ""
    s_min = S.coeffs(run.pipe, run.ts[run.k_range[1] + c.m_steps - 1].view(1))[1].item()
    return "" if s_min >= 0.1 else (f"warning: sharpen_sft's rolled states reach noise level {s_min:.3f}, where the "
                                    "exact target toward the image grows as 1/noise; --sft_target=official or an "
                                    "earlier --start_range end keeps it bounded")


def prepare_sharpen_sft(run, it, micro):
    """Algorithm 1: the trajectories that the path-integral weights select (Eq. 9), each prompt's softmax, or
    (sft_weights=step) one softmax over the optimizer step's trajectories (step_weights); count: the prompts with a
    scored trajectory, or the sum of the step's unnormalised weights on this rank and micro-step."""
    c = run.cfg
    b = rolled(run, run.prompt_range(it, micro))
    if c.sft_weights == "step":
        u = step_weights(b["R"], c.lam, c.m_steps if c.agg == "sum" and c.score_steps == "all" else 1)
        w, count = u.float(), u.sum().item()
    else:
        w = trajectory_weights(b["R"], c.lam, c.normalize)
        count = int((w.sum(1) > 0).sum())
    p_idx, n_idx = select_rows(w)  # only trajectories with w > 0 need a forward
    info = dict(b["info"], w_max=(w.max(1).values / w.sum(1).clamp_min(1e-30)).mean().item())
    if c.replay:  # the anchor: pretraining scenes, each weighing what one prompt's weights sum to
        b["replay"] = R.replay(run, it, micro)
        count, info["replay"] = count + len(b["replay"]["t"]), len(b["replay"]["t"])
    return dict(b, w=w, sel=(p_idx, n_idx), rows=p_idx * c.n_traj + n_idx, count=count, info=info)


def loss_sharpen_sft(run, b):
    """Eq. 9's weighted denoising loss, as a mean over the prompts with a scored trajectory (sft_weights=step: the
    sum of u e over this batch's sum of u; train.py's count scaling makes it the step's softmax-weighted sum);
    with replay, each replayed scene's plain denoising loss counts as one more prompt."""
    loss = R.denoising_sum(run, b["replay"], run.net) / b["count"] if "replay" in b else 0.0
    if len(b["rows"]):
        pred = R.recompute(run, b, b["rows"], run.net)
        loss = loss + sft_loss(pred, b["target"][b["rows"]], b["w"], rows=b["sel"]) * (len(b["w"]) / b["count"])
    return loss, b["info"]


def rlhf_pairs(run, gidx):
    """Algorithm 2 up to the pairs: each prompt's best vs worst trajectory; ties (or < 2 scored trajectories) state
    no preference and drop out. count: the pairs. (The probe's fixed pairs come from here too.)"""
    b = rolled(run, gidx)
    iw, il = best_worst(b["R"])
    ar = torch.arange(len(gidx), device=b["R"].device)
    ar = ar[b["R"][ar, iw] > b["R"][ar, il]]
    rows = torch.cat([ar * run.cfg.n_traj + iw[ar], ar * run.cfg.n_traj + il[ar]])  # (2K,): winners then losers
    return dict(b, R_w=b["R"][ar, iw[ar]], R_l=b["R"][ar, il[ar]], rows=rows, count=len(ar),
                info=dict(b["info"], pairs=len(ar) / len(gidx), acc=math.nan, gap=math.nan))


def prepare_sharpen_rlhf(run, it, micro):
    return rlhf_pairs(run, run.prompt_range(it, micro))


def pair_dpo(run, b, net, R_w, R_l, in_sigmoid):
    """rlhf_loss on b's pairs: the per-trajectory errors of net (with grad where enabled) and of the reference."""
    K, rows = b["count"], b["rows"]
    mse = trajectory_mse(R.recompute(run, b, rows, net), b["target"][rows])
    with torch.no_grad():
        ref = trajectory_mse(R.recompute(run, b, rows, run.ref), b["target"][rows])
    return rlhf_loss(mse[:K], mse[K:], ref[:K], ref[K:], R_w, R_l, run.cfg.beta, in_sigmoid)


def loss_sharpen_rlhf(run, b):
    """Eq. 11: Diffusion-DPO on each pair against the frozen reference, the reward gap inside the sigmoid."""
    loss, d = pair_dpo(run, b, run.net, b["R_w"], b["R_l"], run.cfg.reward_in_sigmoid)
    return loss, dict(b["info"], acc=d["implicit_acc"].item(), gap=d["reward_gap"].item())


def probe_pairs(run, n):
    """The probe: the pairs of n prompts never trained on (negative global indices), of the model as it starts (after
    a resume: the resumed one), not counted as training compute; None for n = 0."""
    if n == 0:
        return None
    with run.uncounted(), run.amp():
        return rlhf_pairs(run, range(-n, 0))


@torch.no_grad()
def probe_line(run, b):
    """The log columns of the probe: implicit accuracy (fraction of h > 0) and mean h of the fixed pairs b
    (rlhf_pairs of prompts never trained on) with the current weights, without the reward gap; "" without pairs."""
    if b is None or b["count"] == 0:
        return ""
    zero = torch.zeros(b["count"], device=run.device)
    with run.uncounted(), run.amp():  # not training compute
        d = pair_dpo(run, b, run.pipe.unet, zero, zero, False)[1]
    return f" | probe_acc {d['implicit_acc'].item():.4f} | probe_h {d['inside'].item():.4f}"
