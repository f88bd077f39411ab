"""
Evaluation: the gold compositional reward of a model on fixed held-out prompts and seeds.

    python eval.py                                         # the built-in toy model, held-out prompts
    python eval.py --model=out/pretrain/model --seeds=8 --split=train
    python eval.py --device=cuda --model=/path/to/folder
    python eval.py --rewards=toyclip+clip@/path/to/clip-vit-large-patch14   # more rewards beside gold

Every model sees the same (prompt, seed) pairs, so numbers compare like for like.
"""
import json
import os
import sys
import time

import torch

import sample as S
import toyworld
from reward import make_reward

# -----------------------------------------------------------------------------
model = S.TOY_MODEL      # a diffusers-style folder
split = "heldout"        # heldout | train: which prompts (a fixed skill-balanced list, toyworld.eval_prompts)
per_skill = 16           # prompts per skill (fewer where a skill has fewer)
seeds = 8                # seeds per prompt: images = prompts x seeds
num_steps = 20           # DDIM steps
guidance = 1.0           # classifier-free guidance scale (1.0 measured best on train prompts)
eta = 0.0
rewards = "toyclip"      # more rewards to score the same images with, '+'-separated reward specs (reward.py)
out_dir = "out/eval"     # results.json, results.md, grid.png
device = "cpu"
# -----------------------------------------------------------------------------


def gold_eval(pipe, split="heldout", per_skill=16, seeds=8, num_steps=20, guidance=1.0, eta=0.0):
    """Mean gold reward overall and per skill over eval_prompts(split) x seeds. Seeds are 0..seeds-1
    for every prompt (the same for every model)."""
    prompts = [p for p in toyworld.eval_prompts(split, per_skill) for _ in range(seeds)]
    seed_list = [i % seeds for i in range(len(prompts))]
    images = S.sample(pipe, prompts, seed_list, num_steps, guidance, eta)
    rewards, info = make_reward("compositional")(images, prompts)
    skills = sorted(set(info["skill"]), key=toyworld.SKILLS.index)
    per = {k: rewards[[s == k for s in info["skill"]]].mean().item() for k in skills}
    return dict(overall=rewards.mean().item(), per_skill=per, n=len(prompts), images=images,
                prompts=prompts, rewards=rewards)


if __name__ == "__main__":
    config = S.configure(globals(), sys.argv[1:])
    torch.set_num_threads(os.cpu_count())
    try:  # every reward loads (or fails with one line) before any sampling
        extra = {spec: make_reward(spec, device) for spec in str(rewards).split("+") if spec}
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    pipe = S.load_model(model, device)
    t0 = time.time()
    res = gold_eval(pipe, split, per_skill, seeds, num_steps, guidance, eta)
    dt = time.time() - t0
    scores = {spec: fn(res["images"], res["prompts"])[0] for spec, fn in extra.items()}
    scores = {spec: r.nanmean().item() for spec, r in scores.items()}  # NaN: a score that failed
    nfe = num_steps * (1 + (guidance != 1))
    rows = [("overall", res["overall"])] + list(res["per_skill"].items()) + list(scores.items())
    table = "| model | split | images | NFE/image | " + " | ".join(k for k, _ in rows) + " |\n"
    table += "|---" * (4 + len(rows)) + "|\n"
    table += f"| {model} | {split} | {res['n']} | {nfe} | " + " | ".join(f"{v:.3f}" for _, v in rows) + " |"
    print(table)
    print(f"{dt / res['n'] * 1000:.0f} ms/image on {device}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(config=config, overall=res["overall"], per_skill=res["per_skill"], rewards=scores, n=res["n"],
                       nfe_per_image=nfe, seconds=dt), f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    first = list(range(0, res["n"], seeds))[:32]  # one image per prompt
    S.save_grid(res["images"][first], [res["prompts"][i] for i in first], os.path.join(out_dir, "grid.png"))
    print(f"wrote {out_dir}/results.json, results.md, grid.png")
