"""
Evaluation: models and inference-time search on fixed held-out prompts and seeds, side by side.

    python eval.py                                          # the built-in toy model, held-out prompts
    python eval.py --models=assets/toy-model+out/sharpen_rlhf/model --search=bon4+noise1x3+greedy2
    python eval.py --model=out/pretrain/model --seeds=8 --split=train
    python eval.py --rewards=toyclip+clip@/path/to/clip-vit-large-patch14   # more rewards beside gold
    python eval.py --device=cuda --models=/path/to/folder

Every model and search method sees the same (prompt, seed) pairs, so numbers and grids compare like
for like. Writes out_dir/results.json, results.md, grid.png (one column per row of the table) and,
with search, reward_vs_nfe.png.
"""
import json
import math
import os
import sys
import time

import torch

import sample as S
import search as Q
import toyworld
from reward import make_reward

# -----------------------------------------------------------------------------
model = S.TOY_MODEL      # a diffusers-style folder (models= compares several)
models = ""              # '+'-separated folders to compare ("" = model); search runs on the first
search = ""              # '+'-separated search rows on the first model: bonN, noiseRxK, greedyK
search_reward = "compositional"  # the verifier search methods use
split = "heldout"        # heldout | train: which prompts (a fixed skill-balanced list, toyworld.eval_prompts)
per_skill = 16           # prompts per skill (fewer where a skill has fewer)
seeds = 8                # seeds per prompt: images = prompts x seeds
num_steps = 20           # DDIM steps
guidance = 1.0           # classifier-free guidance scale (1.0 measured best on train prompts)
eta = 0.0
rewards = "toyclip"      # more rewards to score the same images with, '+'-separated reward specs (reward.py)
out_dir = "out/eval"     # results.json, results.md, grid.png, reward_vs_nfe.png
device = "cpu"
# -----------------------------------------------------------------------------


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


def diversity(images, seeds):
    """Mean pairwise RMS pixel distance between the images of one prompt (consecutive groups of `seeds`)."""
    x = images.float().flatten(1).view(-1, seeds, images[0].numel())
    d = torch.cdist(x, x) / math.sqrt(x.shape[-1])  # (prompts, seeds, seeds)
    return (d.sum((1, 2)) / (seeds * (seeds - 1))).mean().item() if seeds > 1 else 0.0


def gold_eval(pipe, split="heldout", per_skill=16, seeds=8, num_steps=20, guidance=1.0, eta=0.0):
    """Plain sampling of the fixed list, scored by gold (train.py's in-run evaluation)."""
    prompts, seed_list = prompts_and_seeds(split, per_skill, seeds)
    images = S.sample(pipe, prompts, seed_list, num_steps, guidance, eta)
    return dict(gold(images, prompts), images=images, prompts=prompts)


def run_search(pipe, name, prompts, seed_list, verifier):
    """A search row by name: bonN | noiseRxK | greedyK -> (images, NFE per image)."""
    try:
        if name.startswith("bon"):
            images, nfe, _ = Q.best_of_n(pipe, prompts, seed_list, verifier, int(name[3:]), num_steps, guidance, eta)
        elif name.startswith("noise"):
            r, k = (int(v) for v in name[5:].split("x"))
            images, nfe, _ = Q.noise_search(pipe, prompts, seed_list, verifier, r, k, num_steps=num_steps,
                                            guidance=guidance)
        elif name.startswith("greedy"):
            images, nfe, _ = Q.greedy_search(pipe, prompts, seed_list, verifier, int(name[6:]), num_steps, guidance)
        else:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: unknown search {name!r} (expected bonN, noiseRxK or greedyK, e.g. bon4)")
    return images, nfe


def plot(path, series, xlabel, ylabel, logx=True, size=(560, 380)):
    """A line plot as PNG with PIL alone: series {label: [(x, y), ...]} (one point: a marker)."""
    from PIL import Image, ImageDraw
    W, H, L, B = *size, 56, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    fx = (lambda v: math.log2(v)) if logx else (lambda v: v)
    x0, x1 = min(fx(p[0]) for p in pts), max(fx(p[0]) for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y0, y1 = x1 + (x1 == x0), y0 - 0.02, y1 + 0.02
    X = lambda v: L + (fx(v) - x0) / (x1 - x0) * (W - L - 150)  # noqa: E731
    Y = lambda v: H - B - (v - y0) / (y1 - y0) * (H - B - 20)  # noqa: E731
    d.line([(L, 20), (L, H - B), (W - 140, H - B)], fill="black")
    for i in range(5):  # y: 5 ticks; x: 5 ticks, or the powers of two in range on a log axis
        yv = y0 + (y1 - y0) * i / 4
        d.text((4, Y(yv) - 6), f"{yv:.3f}", fill="black")
    step = max(1, math.ceil((x1 - x0) / 8))
    xs = range(math.ceil(x0), math.floor(x1) + 1, step) if logx else [x0 + (x1 - x0) * i / 4 for i in range(5)]
    for xv in xs:
        d.text((L + (xv - x0) / (x1 - x0) * (W - L - 150) - 10, H - B + 4), f"{2 ** xv if logx else xv:.0f}", fill="black")
    d.text((W // 2 - 60, H - 16), xlabel, fill="black"), d.text((4, 2), ylabel, fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
    for i, (label, s) in enumerate(series.items()):
        c, s = colours[i % len(colours)], sorted(s)
        if len(s) > 1:
            d.line([(X(x), Y(y)) for x, y in s], fill=c, width=2)
        for x, y in s:
            d.ellipse([X(x) - 3, Y(y) - 3, X(x) + 3, Y(y) + 3], fill=c)
        d.text((W - 132, 24 + 14 * i), label[:22], fill=c)
    img.save(path)


def amortised_n(bon, target):
    """The N at which best-of-N (points (N, reward), increasing N) first reaches `target`, log-linearly
    interpolated; None if it never does."""
    for (n0, r0), (n1, r1) in zip(bon, bon[1:]):
        if r0 >= target:
            return n0
        if r1 >= target:
            return 2 ** (math.log2(n0) + (target - r0) / (r1 - r0) * (math.log2(n1) - math.log2(n0)))
    return bon[0][0] if bon and bon[0][1] >= target else None


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
    torch.set_num_threads(os.cpu_count())
    try:  # every reward and model folder is checked before any sampling
        extra = {spec: make_reward(spec, device) for spec in str(rewards).split("+") if spec}
        verifier = make_reward(search_reward, device) if search else None
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    folders = [m for m in str(models or model).split("+") if m]
    for f in folders:
        S.check_model_folder(f)
    prompts, seed_list = prompts_and_seeds(split, per_skill, seeds)
    c = 1 + (guidance != 1)
    rows, grids = [], []
    jobs = [(f, None) for f in folders] + [(folders[0], s) for s in str(search).split("+") if s]
    for folder, how in jobs:
        pipe = S.load_model(folder, device)
        t0 = time.time()
        if how:
            images, nfe = run_search(pipe, how, prompts, seed_list, verifier)
        else:
            images, nfe = S.sample(pipe, prompts, seed_list, num_steps, guidance, eta), num_steps * c
        dt = time.time() - t0
        g = gold(images, prompts)
        scores = {spec: fn(images, prompts)[0].nanmean().item() for spec, fn in extra.items()}  # NaN: failed
        d = g["rewards"] - rows[0]["gold_per_image"] if rows else None  # paired: same (prompt, seed) pairs
        rows.append(dict(name=f"{label(folder)} {how}" if how else label(folder), search=how, overall=g["overall"],
                         gold_per_image=g["rewards"], delta=None if d is None else d.mean().item(),
                         delta_se=None if d is None else (d.std() / math.sqrt(len(d))).item(),
                         per_skill=g["per_skill"], rewards=scores, diversity=diversity(images, seeds),
                         nfe_per_image=nfe, ms_per_image=dt / len(prompts) * 1000, n=len(prompts),
                         train_nfe=None if how else train_nfe(folder)))
        grids.append(images[::seeds][:16])  # the first seed of up to 16 prompts
        r = rows[-1]
        print(f"{r['name']}: gold {r['overall']:.3f} | NFE/image {nfe} | {r['ms_per_image']:.0f} ms/image")
    skills = list(rows[0]["per_skill"])
    head = ["model", "gold", "Δ vs first ± SE"] + skills + list(extra) + ["diversity", "NFE/image", "ms/image", "training UNet passes"]
    table = "| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|\n"
    for r in rows:
        vals = [r["overall"]] + [r["per_skill"][k] for k in skills] + list(r["rewards"].values()) + [r["diversity"]]
        delta = "—" if r["delta"] is None else f"{r['delta']:+.3f} ± {r['delta_se']:.3f}"
        table += f"| {r['name']} | {vals[0]:.3f} | {delta} | " + " | ".join(f"{v:.3f}" for v in vals[1:]) + \
            f" | {r['nfe_per_image']} | {r['ms_per_image']:.0f} | {r['train_nfe'] or '—'} |\n"
    table += f"\n{len(prompts)} images per row ({split} prompts x {seeds} seeds), {num_steps} DDIM steps, " \
             f"guidance {guidance}; search verifier: {search_reward}; on {device}. Δ: mean paired difference in " \
             f"gold from the first row over the same (prompt, seed) pairs, ± its standard error."
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    for r in rows:
        r["gold_per_image"] = r["gold_per_image"].tolist()
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(config=config, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    k = min(len(g) for g in grids)  # one column per row of the table, the same prompts down each column
    grid = torch.stack([g[:k] for g in grids], 1).flatten(0, 1)
    S.save_grid(grid, [f"{i % len(rows)}: {prompts[(i // len(rows)) * seeds]}" for i in range(len(grid))],
                os.path.join(out_dir, "grid.png"), ncol=len(rows))
    if search:
        series = {}
        for r in rows:
            name = r["search"].rstrip("0123456789x") if r["search"] else r["name"]
            series.setdefault(name, []).append((r["nfe_per_image"], r["overall"]))
        plot(os.path.join(out_dir, "reward_vs_nfe.png"), series, "NFE per image (log)", "held-out gold")
    print(f"wrote {out_dir}/results.json, results.md, grid.png" + (", reward_vs_nfe.png" if search else ""))


if __name__ == "__main__":
    main()
