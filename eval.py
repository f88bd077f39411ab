"""
Evaluation: models and inference-time search on fixed held-out prompts and seeds, side by side.

    python eval.py                                          # the built-in toy model, held-out prompts
    python eval.py --models=assets/toy-model+out/sharpen_rlhf/model --search=bon4+noise1x3+greedy2
    python eval.py --model=out/pretrain/model --seeds=8 --split=train
    python eval.py --rewards=toyclip+clip@/path/to/clip-vit-large-patch14   # more rewards beside gold
    python eval.py --device=cuda --dtype=bf16 --models=BASE+SHARPENED --prompt_file=geneval --seeds=4 \
        --rewards=clip@weights/clip-vit-large-patch14+pickscore@weights/PickScore_v1 --geneval_out=out/geneval
                                                            # real models: a prompt set, learned metrics, GenEval's layout

Every model and search method sees the same (prompt, seed) pairs, so numbers and grids compare like for like. On the
toy world (the default) the gold judge heads the table, with fidelity beside it; with --prompt_file (any prompts,
benchmarks.py) the first of --rewards does, and every metric is reported overall, per tag and as a paired difference.
Writes out_dir/results.json, results.md, grid.png (one column per row of the table) and, with search,
reward_vs_nfe.png. Inference-time search is what Diffusion-Sharpening competes with: more UNet passes (NFE) per
image, with a reward as verifier, instead of training. Each method returns the NFE it spent per image.

    best_of_n      N full samples from N seeds, keep the best (N=1 is plain sampling)
    noise_search   zero-order search over the initial noise (Ma et al. 2025, arXiv 2501.09732): a pivot noise,
                   K neighbours per round on the sphere around it, move to the best, R rounds
    greedy_search  per-step search in the spirit of Demon (Yeh et al. 2024, arXiv 2410.05760): at every step
                   branch K stochastic DDIM steps, keep the one whose next x0 prediction scores best
"""
import json
import math
import os
import re
import sys
import time

import torch

import benchmarks as BM
import fidelity as F
import figures as FIG
import models as M
import sample as S
import toyworld
from reward import load_clip, make_reward, preprocess, clip_features

# -----------------------------------------------------------------------------
model = M.TOY_MODEL      # a diffusers-style folder (models= compares several)
models = ""              # '+'-separated folders to compare ("" = model); search runs on the first
search = ""              # '+'-separated search rows on the first model: bonN, noiseRxK, greedyK
search_reward = "compositional"  # the verifier search methods use
amortise = 0             # > 0: the first model's best-of-N curve from this many candidates (verifier: the headline
                         # metric), and the N whose best-of-N each other model matches, 95 % bootstrap bounds over prompts
split = "heldout"        # heldout | train: which prompts (a fixed skill-balanced list, toyworld.eval_prompts)
prompt_file = ""         # or prompts from a .txt / .jsonl file or a named set (benchmarks.py: geneval); the toy world's
                         # gold and fidelity then give way to `rewards`, the first of which heads the table
geneval_out = ""         # a folder: each row's images in GenEval's layout, geneval_out/<row>/<index:05d>/samples/
geneval_results = ""     # GenEval's results file for those folders: its score (mean over tags) as a metric
diversity_clip = ""      # a CLIP folder: diversity as the mean pairwise cosine distance of its image embeddings within a
                         # prompt ("" = RMS pixel distance)
per_skill = 16           # prompts per skill (fewer where a skill has fewer)
seeds = 8                # seeds per prompt: images = prompts x seeds
num_steps = 20           # DDIM steps
guidance = 1.0           # classifier-free guidance scale (1.0 measured best on train prompts)
uncond_embed = "auto"    # CFG's unconditional input: auto (the folder's pipeline: zeros for SDXL, else "") | zeros | empty
resolution = 0           # image side in pixels (0: the model's own; FLUX: 1024)
eta = 0.0
rewards = "toyclip"      # metrics: reward specs (reward.py) to score the same images with, '+'-separated
out_dir = "out/eval"     # results.json, results.md, grid.png, reward_vs_nfe.png
device = "cpu"
dtype = "fp32"           # fp32 | bf16 | fp16: the models' weights (inputs follow them)
batch_size = 64          # images sampled (and searched) at once
threads = 0              # torch threads (0 = every core)
# -----------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prompts_and_seeds(split="heldout", per_skill=16, seeds=8):
    """The fixed evaluation list: every prompt of eval_prompts(split) with seeds 0..seeds-1."""
    prompts = [p for p in toyworld.eval_prompts(split, per_skill) for _ in range(seeds)]
    return prompts, [i % seeds for i in range(len(prompts))]


def gold(images, prompts):
    """Mean gold reward overall and per skill, and the per-image rewards."""
    r, info = make_reward("compositional")(images, prompts)
    skills = sorted(set(info["skill"]), key=toyworld.SKILLS.index)
    per = {k: r[[s == k for s in info["skill"]]].mean().item() for k in skills}
    return dict(overall=r.mean().item(), per_skill=per, n=len(prompts), rewards=r)


def diversity(images, seeds, clip=None):
    """Mean pairwise distance between the images of one prompt (consecutive groups of `seeds`): RMS pixel distance, or
    with clip (model, processor) 1 - cosine similarity of its image embeddings."""
    if seeds < 2:
        return 0.0
    if clip is None:
        x = images.float().flatten(1).view(-1, seeds, images[0].numel())
        d = torch.cdist(x, x) / math.sqrt(x.shape[-1])  # (prompts, seeds, seeds)
    else:
        with torch.no_grad():
            e = torch.cat([clip_features(clip[0].get_image_features(pixel_values=preprocess(x, clip[1]).to(
                clip[0].device))).float() for x in images.split(64)])
        e = torch.nn.functional.normalize(e, dim=-1).view(-1, seeds, e.shape[-1])
        d = 1 - e @ e.transpose(1, 2)
    return (d.sum((1, 2)) / (seeds * (seeds - 1))).mean().item()


def paired(a, b):
    """Mean and standard error of a - b over the pairs where both are finite (NaN: a failed score): (nan, nan) if none."""
    d = (a - b)[(a - b).isfinite()]
    return (d.mean().item(), (d.std() / math.sqrt(len(d))).item() if len(d) > 1 else float("nan")) if len(d) else \
        (float("nan"), float("nan"))


def by_tag(values, tags):
    """Mean of the finite values per tag, tags in first-seen order ("" tags, or tags None: none)."""
    return {t: values[[x == t for x in tags]].nanmean().item() for t in dict.fromkeys(tags or []) if t}


def geneval_score(correct, tags):
    """GenEval's overall score: the mean over its tags of the fraction of correct images (summary_scores.py)."""
    per = by_tag(correct, tags)
    return sum(per.values()) / len(per) if per else correct.nanmean().item()


def gold_eval(pipe, split="heldout", per_skill=16, seeds=8, num_steps=20, guidance=1.0, eta=0.0):
    """Plain sampling of the fixed list, scored by gold (train.py's in-run evaluation)."""
    prompts, seed_list = prompts_and_seeds(split, per_skill, seeds)
    images = S.sample(pipe, prompts, seed_list, num_steps, guidance, eta)
    return dict(gold(images, prompts), images=images, prompts=prompts)


# -----------------------------------------------------------------------------
# inference-time search: the same (prompt, seed) pairs as sample.sample, deterministic in them

def candidate_noise(pipe, seed, j):
    """Candidate j's initial noise for a (prompt, seed) pair; candidate 0 is sample.sample's own."""
    shape = pipe.latent_shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) + 1_000_003 * j))


def sample_from(pipe, noises, prompts, ts, guidance, eta, seeds):
    """Full DDIM samples from given noises (B,C,H,W) -> images in [0,1]."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    for g in gens:  # advance past the initial draw, as sample.sample's generators are (eta > 0 steps)
        torch.randn(noises.shape[1:], generator=g)
    x = S.rollout(pipe, noises.to(pipe.device), ts, M.encode(pipe, prompts), M.uncond(pipe),
                  guidance, eta, gens, record=False)
    return M.to_images(pipe, x)


@torch.no_grad()
def best_of_n(pipe, prompts, seeds, reward_fn, N, num_steps=20, guidance=1.0, eta=0.0):
    """-> (images (B,3,H,W), nfe per image, info with the chosen candidate and all rewards (B, N))."""
    ts, B = S.timesteps(pipe, num_steps), len(prompts)
    rewards = []
    for j in range(N):  # one candidate of every prompt per batch: memory stays that of plain sampling
        noises = torch.stack([candidate_noise(pipe, s, j) for s in seeds])
        images = sample_from(pipe, noises, prompts, ts, guidance, eta, [int(s) + 1_000_003 * j for s in seeds])
        r = reward_fn(images, prompts)[0].float().nan_to_num(-float("inf"))  # a failed score never wins
        if j == 0:
            best, best_r, idx = images, r, torch.zeros(B, dtype=torch.long)
        better = r > best_r  # ties keep the earlier candidate (all False for j = 0)
        best = torch.where(better.view(-1, 1, 1, 1), images, best)
        best_r, idx = torch.where(better, r, best_r), torch.where(better, j, idx)
        rewards.append(r)
    return best, N * num_steps * S.passes_per_call(guidance, pipe.family), dict(choice=idx, rewards=torch.stack(rewards, 1))


@torch.no_grad()
def noise_search(pipe, prompts, seeds, reward_fn, rounds, K, radius=0.5, num_steps=20, guidance=1.0):
    """Zero-order search: neighbour = (pivot + radius * z) / sqrt(1 + radius^2), still N(0, I) marginally.
    NFE per image = (1 + rounds * K) * num_steps (* 2 with guidance)."""
    ts = S.timesteps(pipe, num_steps)
    pivot = torch.stack([candidate_noise(pipe, s, 0) for s in seeds])
    best = sample_from(pipe, pivot, prompts, ts, guidance, 0.0, seeds)
    best_r = reward_fn(best, prompts)[0].float().nan_to_num(-float("inf"))
    for rnd in range(rounds):
        cand_noise, cand_img, cand_r = [], [], []
        for k in range(K):
            z = torch.stack([candidate_noise(pipe, s, 1 + rnd * K + k) for s in seeds])
            noise = (pivot + radius * z) / (1 + radius ** 2) ** 0.5
            images = sample_from(pipe, noise, prompts, ts, guidance, 0.0, seeds)
            cand_noise.append(noise), cand_img.append(images)
            cand_r.append(reward_fn(images, prompts)[0].float().nan_to_num(-float("inf")))
        r, k = torch.stack(cand_r, 1).max(1)  # the best neighbour of each prompt
        better = r > best_r  # move only when it improves: the pivot's own score is kept
        ar = torch.arange(len(prompts))
        pivot = torch.where(better.view(-1, 1, 1, 1), torch.stack(cand_noise, 1)[ar, k], pivot)
        best = torch.where(better.view(-1, 1, 1, 1), torch.stack(cand_img, 1)[ar, k], best)
        best_r = torch.where(better, r, best_r)
    return best, (1 + rounds * K) * num_steps * S.passes_per_call(guidance, pipe.family), dict(rewards=best_r)


@torch.no_grad()
def greedy_search(pipe, prompts, seeds, reward_fn, K, num_steps=20, guidance=1.0, eta=1.0):
    """At each step, K stochastic DDIM steps (eta > 0) branch from the kept state; each branch's x0
    prediction at its new state (one UNet pass, reused by the next step) is scored; the best is kept.
    NFE per image = (1 + (num_steps - 1) * K) * (1 or 2): the last step lands on the clean image."""
    ts, B = S.timesteps(pipe, num_steps), len(prompts)
    cond, uncond = M.encode(pipe, prompts), M.uncond(pipe)
    x = torch.stack([candidate_noise(pipe, s, 0) for s in seeds]).to(pipe.device)
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
        r = reward_fn(M.to_images(pipe, x0), [p for p in prompts for _ in range(K)])[0].float()
        k = r.nan_to_num(-float("inf")).view(B, K).argmax(1)  # ties: the first branch
        x, out = x_new.view(B, K, *x.shape[1:])[ar, k], out_new.view(B, K, *out.shape[1:])[ar, k]
    x, _, _ = S.ddim_step(pipe, x, out, ts[-2].expand(B), ts[-1].expand(B))
    return M.to_images(pipe, x), (1 + (num_steps - 1) * K) * S.passes_per_call(guidance, pipe.family), {}


def expected_best(rewards):
    """rewards (B, K) of K candidates -> (B, K): column N-1 is the expected max of N drawn without replacement
    (unbiased, as pass@k: sorted ascending, r_(i) is the max of a draw with prob C(i-1, N-1) / C(K, N))."""
    r, K = rewards.double().sort(1).values, rewards.shape[1]
    w = torch.tensor([[math.comb(i - 1, n - 1) / math.comb(K, n) for i in range(1, K + 1)] for n in range(1, K + 1)],
                     dtype=torch.float64)
    return r @ w.T


def matching_n(curve, g):
    """The N at which a best-of-N curve (N = 1..K, increasing) reaches g, linear in log N between integers;
    below best-of-1: log-extrapolated from the first segment, floored at 1/K; above best-of-K: inf."""
    logn = torch.log(torch.arange(1, len(curve) + 1, dtype=torch.float64))
    if g >= curve[-1]:
        return math.inf if g > curve[-1] else float(len(curve))
    j = max(1, int(torch.searchsorted(curve.contiguous(), torch.tensor([g], dtype=curve.dtype))[0]))
    slope = (curve[j] - curve[j - 1]) / (logn[j] - logn[j - 1])
    return max(1 / len(curve), math.exp(logn[j - 1] + (g - curve[j - 1]) / slope)) if slope > 0 else float(j)


def amortisation(base_rewards, model_gold, groups, boot=1000, seed=0, base_gold=None):
    """base_rewards (B, K): the base model's K candidates per (prompt, seed) pair; model_gold (B,): a trained
    model's gold on the same pairs; groups (B,): the prompt of each pair. -> dict(n, lo, hi): the N whose
    best-of-N the model matches, and its 95 % bounds from resampling prompts (paired). With base_gold (B,), the
    base's own sample of each pair (the noise the model's sample shares), also n_paired (lo_, hi_paired): the
    N matched by best-of-1 of the curve plus the paired difference model - base, which leaves out how lucky
    the shared noises are against the mean of the K candidates."""
    eb = expected_best(base_rewards)
    ids = sorted(set(groups))
    rows = {p: [i for i, q in enumerate(groups) if q == p] for p in ids}
    d = None if base_gold is None else (model_gold.double() - base_gold.double())

    def levels(pick):
        c = eb[pick].mean(0)
        out = [matching_n(c, model_gold[pick].double().mean().item())]
        return out + ([] if d is None else [matching_n(c, c[0].item() + d[pick].mean().item())])
    found = levels(list(range(len(groups))))
    g, draws = torch.Generator().manual_seed(seed), []
    for _ in range(boot):
        draws.append(levels([i for j in torch.randint(len(ids), (len(ids),), generator=g).tolist() for i in rows[ids[j]]]))
    q = torch.tensor(draws, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    out = dict(n=found[0], lo=q[0, 0].item(), hi=q[1, 0].item(), curve=eb.mean(0).tolist())
    if d is not None:
        out.update(n_paired=found[1], lo_paired=q[0, 1].item(), hi_paired=q[1, 1].item())
    return out


def parse_search(name):
    """bonN -> ("bon", [N]), noiseRxK -> ("noise", [R, K]), greedyK -> ("greedy", [K]); None for others, or a count < 1."""
    m = re.fullmatch(r"bon(\d+)|noise(\d+)x(\d+)|greedy(\d+)", name)
    counts = [int(v) for v in m.groups() if v is not None] if m else [0]
    return (name.rstrip("0123456789x"), counts) if min(counts) >= 1 else None


def run_search(pipe, name, prompts, seed_list, verifier):
    """A row by name: None (plain sampling) | bonN | noiseRxK | greedyK -> (images, NFE per image), batch_size
    (prompt, seed) pairs at a time (each pair's result depends on it alone)."""
    if len(prompts) > batch_size:
        parts = [run_search(pipe, name, prompts[i:i + batch_size], seed_list[i:i + batch_size], verifier)
                 for i in range(0, len(prompts), batch_size)]
        return torch.cat([p[0] for p in parts]), parts[0][1]
    if not name:
        return S.sample(pipe, prompts, seed_list, num_steps, guidance, eta), num_steps * S.passes_per_call(guidance, pipe.family)
    how, n = parse_search(name)  # main() checked every name
    if how == "bon":
        return best_of_n(pipe, prompts, seed_list, verifier, n[0], num_steps, guidance, eta)[:2]
    if how == "noise":
        return noise_search(pipe, prompts, seed_list, verifier, *n, num_steps=num_steps, guidance=guidance)[:2]
    return greedy_search(pipe, prompts, seed_list, verifier, n[0], num_steps, guidance)[:2]


# -----------------------------------------------------------------------------

def train_nfe(folder):
    """The UNet cost train.py spent on a model (the last `nfe` of out_dir/log.txt beside out_dir/model)."""
    log = os.path.join(os.path.dirname(os.path.normpath(folder)), "log.txt")
    nfe = [l.split("| nfe ")[1].split()[0] for l in open(log) if l.startswith("step ") and "| nfe " in l] \
        if os.path.exists(log) else []
    return int(nfe[-1]) if nfe else None


def label(folder):
    """A short name for a model folder: out/sharpen_rlhf/model -> sharpen_rlhf."""
    parts = os.path.normpath(folder).split(os.sep)
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]


def main():
    config = S.configure(globals(), sys.argv[1:])
    folders, searches = [m for m in str(models or model).split("+") if m], [s for s in str(search).split("+") if s]
    specs, toy = [spec for spec in str(rewards).split("+") if spec], not prompt_file
    bad = next((s for s in searches if parse_search(s) is None), None)
    for ok, message in [  # every setting with a range, checked before any model loads: one error line
            (folders, f"--models={models!r} --model={model!r} name no model folder"),
            (bad is None, f"--search: {bad!r} is not a search (bonN with N >= 1, noiseRxK with R, K >= 1, greedyK with K "
                          ">= 1; e.g. bon4)"),
            (split in ("heldout", "train"), f"--split must be heldout or train, got {split!r}"),
            (per_skill >= 1, f"--per_skill must be >= 1, got {per_skill}"),
            (seeds >= 1, f"--seeds must be >= 1, got {seeds}"),
            (num_steps >= 1, f"--num_steps must be >= 1, got {num_steps}"),
            (amortise == 0 or amortise >= 2, f"--amortise must be 0 (off) or >= 2 candidates, got {amortise}"),
            (0 <= guidance < math.inf, f"--guidance must be a finite scale >= 0 (1: conditional only), got {guidance}"),
            (0 <= eta < math.inf, f"--eta must be a finite DDIM eta >= 0 (0: deterministic), got {eta}"),
            (resolution >= 0, f"--resolution must be 0 (the model's) or a positive side in pixels, got {resolution}"),
            (threads >= 0, f"--threads must be >= 0 (0: every core), got {threads}"),
            (batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}"),
            (dtype in DTYPES, f"--dtype must be fp32, bf16 or fp16, got {dtype!r}"),
            (uncond_embed in ("auto", "zeros", "empty"), f"--uncond_embed must be auto, zeros or empty, got {uncond_embed!r}"),
            (toy or specs or geneval_results, "--prompt_file: name a metric (--rewards=clip@<folder>, ...) or "
                                              "--geneval_results; the toy world's gold judge reads toy captions only"),
            (toy or not amortise or specs, "--amortise with --prompt_file: its verifier is the first of --rewards; name one"),
            (toy or not search or search_reward != "compositional", "--search with --prompt_file needs a --search_reward "
                                                                   "that reads any prompt (e.g. clip@<folder>)"),
            (not geneval_results or geneval_out, "--geneval_results reads the folders --geneval_out names: give both"),
            (not device.startswith("cuda") or torch.cuda.is_available(), "--device=cuda but no CUDA device is available")]:
        if not ok:
            raise SystemExit(f"error: {message}")
    try:  # the prompts, then what each folder's configs allow, still before any model loads
        items = BM.read_prompt_set(prompt_file) if prompt_file else None
    except BM.PromptSetError as e:
        raise SystemExit(f"error: --prompt_file: {e}")
    for f in folders:
        M.check_model_folder(f, resolution)
    if diversity_clip and not os.path.isdir(diversity_clip):
        raise SystemExit(f"error: --diversity_clip: no CLIPModel folder at {diversity_clip!r}")
    torch.set_num_threads(threads or os.cpu_count())
    try:  # every reward loads before any sampling
        extra = {spec: make_reward(spec, device) for spec in specs}
    except ValueError as e:
        raise SystemExit(f"error: --rewards: {e}")
    try:
        verifier = make_reward(search_reward, device) if search else None
    except ValueError as e:
        raise SystemExit(f"error: --search_reward: {e}")
    clip = load_clip(diversity_clip, device)[::2] if diversity_clip else None  # (model, image processor)
    if toy:
        prompts, seed_list = prompts_and_seeds(split, per_skill, seeds)
        items, tags = [dict(prompt=p, metadata=dict(prompt=p)) for p in prompts[::seeds]], None
    else:
        prompts = [it["prompt"] for it in items for _ in range(seeds)]
        seed_list, tags = [i % seeds for i in range(len(prompts))], [it["tag"] for it in items for _ in range(seeds)]
    row_names = [label(f) for f in folders] + [f"{label(folders[0])} {s}" for s in searches]
    row_names = [n if row_names[:i].count(n) == 0 else f"{n} #{row_names[:i].count(n) + 1}" for i, n in enumerate(row_names)]
    dirs = [os.path.join(geneval_out, re.sub(r"\W+", "_", n)) for n in row_names] if geneval_out else []
    try:
        graded = BM.read_geneval(geneval_results, dirs) if geneval_results else None
    except BM.PromptSetError as e:
        raise SystemExit(f"error: --geneval_results: {e}")
    rows, grids, judge = [], [], None  # judge: the first model, whose denoising loss on each row's images is `denoise`
    for i, (folder, how) in enumerate([(f, None) for f in folders] + [(folders[0], s) for s in searches]):
        pipe = M.load_model(folder, device, DTYPES[dtype], uncond=uncond_embed, resolution=resolution)
        if judge is None and toy:
            judge, reference = pipe, F.denoise_loss(pipe, F.renders(prompts, seed_list), prompts)
        t0 = time.time()
        images, nfe = run_search(pipe, how, prompts, seed_list, verifier)
        dt = time.time() - t0
        scores = {spec: fn(images, prompts)[0].float().cpu() for spec, fn in extra.items()}  # NaN: failed
        if graded is not None:  # GenEval's verdict per image (NaN: not in its results)
            got = graded[dirs[i]]
            scores["geneval"] = torch.tensor([float(got.get((j // seeds, j % seeds), math.nan)) for j in range(len(prompts))])
        if toy:
            g = gold(images, prompts)
            head, per_image, per_tag, fid = "gold", g["rewards"], g["per_skill"], F.fidelity(images, prompts, seed_list, judge, reference)
        else:
            head = next(iter(scores))
            per_image, per_tag, fid = scores.pop(head), None, {}
            per_tag = by_tag(per_image, tags)
        first = rows[0] if rows else None
        d, se = paired(per_image, first["per_image"]) if first else (None, None)  # the same (prompt, seed) pairs
        rows.append(r := dict(
            name=row_names[i], search=how, metric=head, overall=geneval_score(per_image, tags) if head == "geneval" else
            per_image.nanmean().item(), per_image=per_image, delta=d, delta_se=se, per_skill=per_tag,
            rewards={k: geneval_score(v, tags) if k == "geneval" else v.nanmean().item() for k, v in scores.items()},
            rewards_delta={k: paired(v, first["scores"][k]) for k, v in scores.items()} if first else {}, scores=scores,
            tag_means={k: by_tag(v, tags) for k, v in scores.items()} if tags else {},
            diversity=diversity(images, seeds, clip), **fid, nfe_per_image=nfe, ms_per_image=dt / len(prompts) * 1000,
            n=len(prompts), train_nfe=None if how else train_nfe(folder)))
        if toy:
            r["gold_per_image"] = per_image
        if geneval_out:
            BM.write_geneval(dirs[i], items, seeds, images)
        grids.append(images[::seeds][:16])  # the first seed of up to 16 prompts
        print(f"{r['name']}: {head} {r['overall']:.3f} | NFE/image {nfe} | {r['ms_per_image']:.0f} ms/image", flush=True)
    table = results_table(rows, prompts, toy)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    plain = lambda r: {k: v.tolist() if torch.is_tensor(v) else {s: x.tolist() for s, x in v.items()} if k == "scores" else v
                       for k, v in r.items()}  # noqa: E731
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(config=config, rows=[plain(r) for r in rows]), f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    k = min(len(g) for g in grids)  # one column per row of the table, the same prompts down each column
    FIG.comparison_grid(os.path.join(out_dir, "grid.png"), [g[:k] for g in grids],
                        [f"{r['name']}\nNFE {r['nfe_per_image']}" for r in rows], prompts[::seeds][:k])
    if search:
        FIG.reward_vs_nfe_figure(os.path.join(out_dir, "reward_vs_nfe.png"), rows)
    if amortise:
        amortisation_report(rows, prompts, seed_list)
    print(f"wrote {out_dir}/results.json, results.md, grid.png" + (", reward_vs_nfe.png" if search else "") +
          (", amortisation.md, amortisation.png" if amortise else "") + (f"; GenEval's layout in {geneval_out}/" if geneval_out else ""))


def results_table(rows, prompts, toy):
    """The markdown table: the headline metric and its paired Δ, per skill or tag, the other metrics (their paired Δ
    beside), diversity, fidelity (toy world), cost."""
    tags, others = list(rows[0]["per_skill"]), list(rows[0]["rewards"])
    fid = ["background", "palette", "denoise"] if toy else []
    head = ["model", rows[0]["metric"], "Δ vs first ± SE"] + tags + others + ["diversity"] + \
        ["denoise ×" if k == "denoise" else k for k in fid] + ["NFE/image", "ms/image", "training UNet passes"]
    table = "| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|\n"
    for r in rows:
        delta = "—" if r["delta"] is None else f"{r['delta']:+.3f} ± {r['delta_se']:.3f}"
        cells = [f"{r['per_skill'].get(t, math.nan):.3f}" for t in tags]
        cells += [f"{r['rewards'][k]:.3f}" + (" ({:+.3f} ± {:.3f})".format(*r["rewards_delta"][k]) if r["rewards_delta"] else "")
                  for k in others]
        cells += [f"{r[k]:.3f}" for k in ["diversity"] + fid]
        table += f"| {r['name']} | {r['overall']:.3f} | {delta} | " + " | ".join(cells) + \
            f" | {r['nfe_per_image']} | {r['ms_per_image']:.0f} | {r['train_nfe'] or '—'} |\n"
    where = f"{split} prompts" if toy else f"{prompt_file}'s {len(prompts) // seeds} prompts"
    table += f"\n{len(prompts)} images per row ({where} x {seeds} seeds), {num_steps} steps (DDIM; Euler for a flow " \
             f"model), guidance {guidance}; search verifier: {search_reward}; on {device}, {dtype}. Δ: mean paired " \
             f"difference from the first row over the same (prompt, seed) pairs, ± its standard error (in brackets for " \
             f"the other metrics; a failed score leaves its pair out)." + (" geneval: GenEval's score, the mean over its " \
             "tags of the fraction of correct images; its Δ per image." if geneval_results else "")
    if toy:
        table += f" Fidelity (fidelity.py; 0, 0 and 1 for renders): background, mean |1 − value| of background pixels; " \
                 f"palette, mean distance of a pixel to its nearest palette colour; denoise, the first model's denoising " \
                 f"loss on the images over its loss on renders of the same prompts (t = {', '.join(map(str, F.DENOISE_T))}, " \
                 f"mean of the ratios)."
    return table


def amortisation_report(rows, prompts, seed_list):
    """Best-of-N of the first model with the headline metric as verifier (gold; with --prompt_file the first of
    --rewards), N = 1..amortise, candidate 0 its plain sample, and for every other model (not search rows) the N it
    matches: amortisation.md/.json and amortisation.png."""
    head = rows[0]["metric"]
    pipe = M.load_model(str(models or model).split("+")[0], device, DTYPES[dtype], uncond=uncond_embed, resolution=resolution)
    judge = make_reward("compositional" if head == "gold" else head, device)
    base = dict(rewards=torch.cat([best_of_n(pipe, prompts[i:i + batch_size], seed_list[i:i + batch_size], judge, amortise,
                                             num_steps, guidance, eta)[2]["rewards"] for i in range(0, len(prompts), batch_size)]))
    out = {r["name"]: amortisation(base["rewards"], r["per_image"], prompts, base_gold=rows[0]["per_image"])
           for r in rows[1:] if not r["search"]}
    curve = expected_best(base["rewards"]).mean(0).tolist()
    md = (f"| model | {head} | matches the base's best-of-N | 95 % bounds | paired: best-of-1 + Δ | 95 % bounds |\n"
          "|---|---|---|---|---|---|\n")
    md += "".join(f"| {name} | {r['overall']:.3f} | {a['n']:.2f} | {a['lo']:.2f} – {a['hi']:.2f} | {a['n_paired']:.2f} | "
                  f"{a['lo_paired']:.2f} – {a['hi_paired']:.2f} |\n" for r in rows[1:] if (name := r["name"]) in out for a in [out[name]])
    md += f"\nBase ({rows[0]['name']}) best-of-N, N = 1..{amortise} ({head} verifier, expected max of N of {amortise} " \
          "candidates per pair): " + ", ".join(f"{v:.3f}" for v in curve) + \
          ". Bounds: 1,000 resamples of the prompts, each with its seeds, the same for base and model. Paired: the N whose " \
          "best-of-N reaches best-of-1 + the model's paired difference from the base's own samples (the seeds' luck left out)."
    print(md)
    with open(os.path.join(out_dir, "amortisation.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out_dir, "amortisation.json"), "w") as f:
        json.dump(dict(curve=curve, models={k: {kk: v for kk, v in a.items() if kk != "curve"} for k, a in out.items()}),
                  f, indent=1)
    FIG.amortisation_figure(os.path.join(out_dir, "amortisation.png"), curve,
                            {r["name"]: r["overall"] for r in rows[1:] if r["name"] in out}, rows[0]["nfe_per_image"],
                            f"{split} gold reward" if head == "gold" else head)


if __name__ == "__main__":
    main()
