"""
Reproduce the README's results section on the toy world, end to end and resumable: every training
method at equal UNet compute, inference-time search against them, the paper's n/m ablations, our
extensions (soft weights, exact vs official target, backprop through the chain) and reward hacking.

    python reproduce.py              # ~40 min on 2 CPU cores -> out/reproduce/results.md + PNG figures
    python reproduce.py --quick      # tiny settings, about a minute (test_all.py runs it)

Each stage is a train.py / eval.py subprocess that writes its own folder; a stage whose output exists
is skipped and an interrupted training run continues from its checkpoint, so re-running the command
after a crash picks up where it stopped. Held-out prompts and seeds are fixed (eval.py).
"""
import json
import os
import re
import subprocess
import sys
import time

import sample as S

# -----------------------------------------------------------------------------
out = "out/reproduce"    # everything goes here
quick = False            # tiny settings: checks the pipeline, numbers mean nothing
budget = 25000           # UNet cost per main training run (train.py nfe_budget: forward passes, grad x3)
methods = "sharpen_rlhf+sharpen_sft+sft+diffusion_dpo+ddpo"
ablation_steps = 40      # sharpen_sft steps per ablation run (fixed steps, as the paper's tables)
eval_seeds = 4           # seeds per held-out prompt in the final tables (41 prompts x 4 = 164 images)
curve_evals = 3          # held-out evaluations during each main run (2 seeds each): the convergence figure
search = "bon1+bon2+bon4+bon8+noise1x3+greedy2"
hack_reward = "toyclip"  # reward-hacking runs: these methods on this learned reward, gold tracked
hack_methods = "sharpen_rlhf+ddpo"
# -----------------------------------------------------------------------------
# the train.py settings every run here was made with (train.py's defaults until 2026-11-25; its defaults
# since then are the faster-learning ones of README "Default runs"): stage flags and --quick come after
PINNED = ["--prompts_per_step=8", "--lr=1e-5", "--m_steps=3", "--start_range=", "--dpo_target=start"]


def sh(script, *args, log=None):
    """Run one of our scripts; its output goes to `log` (and its tail into the error on failure)."""
    cmd = [sys.executable, script, *map(str, args)]
    t0 = time.time()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(__file__)))
    if p.returncode:
        tail = open(log).read()[-1500:] if log else ""
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}); see {log}\n{tail}")
    print(f"  {os.path.basename(script)} {' '.join(map(str, args))[:100]} ({time.time() - t0:.0f}s)", flush=True)


def train(name, *args):
    """train.py into out/name unless it already finished; resume it if it was interrupted."""
    d = os.path.join(out, name)
    if os.path.exists(os.path.join(d, "model", "unet")) and os.path.exists(os.path.join(d, "done")):
        return d
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(d, "ckpt.pt")) else []
    os.makedirs(d, exist_ok=True)
    sh("train.py", f"--out_dir={d}", *PINNED, *TINY, *args, *resume, log=os.path.join(d, "stdout.txt"))
    open(os.path.join(d, "done"), "w").close()
    return d


def evals(d):
    """The eval lines of a train.py log: [(step, nfe, gold, {extra: value})]."""
    rows = []
    for line in open(os.path.join(d, "log.txt")):
        if line.startswith("eval "):
            kv = dict(re.findall(r"\| ([\w ]+?) ([-\d.]+)(?= \||$)", line.strip()))
            rows.append((int(kv["step"]), int(kv["nfe"]), float(kv["heldout gold"]), kv))
    return rows


def evaluate(name, models, extra=()):
    """eval.py over the fixed held-out list -> its rows (cached in out/name/results.json)."""
    d = os.path.join(out, name)
    if not os.path.exists(os.path.join(d, "results.json")):
        sh("eval.py", f"--models={'+'.join(models)}", f"--seeds={eval_seeds}", f"--out_dir={d}", *EVAL_TINY, *extra,
           log=os.path.join(out, f"{name}.txt"))
    return json.load(open(os.path.join(d, "results.json")))["rows"]


def main():
    global TINY, EVAL_TINY, budget, ablation_steps, eval_seeds, search, methods, curve_evals
    S.configure(globals(), sys.argv[1:])
    TINY, EVAL_TINY = [], []
    ns, ms = (1, 2, 3, 4, 8), (1, 2, 3, 4, 8)
    if quick:
        TINY = ["--prompts_per_step=2", "--num_steps=4", "--threads=1", "--dpo_pool=4", "--eval_seeds=1", "--probe_pairs=0"]
        EVAL_TINY = ["--num_steps=4", "--per_skill=1"]
        budget, ablation_steps, eval_seeds, ns, ms, curve_evals = 400, 2, 1, (2,), (1,), 1
        search = "bon1+bon2+noise1x2+greedy2"
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    print(f"1/4 training methods at equal compute ({budget} UNet passes each, grad x3)")
    curve_seeds = 1 if quick else 2
    runs = {m: train(m, f"--method={m}", f"--nfe_budget={budget}", f"--eval_count={curve_evals}",
                     f"--eval_seeds={curve_seeds}", "--ckpt_interval=10") for m in methods.split("+")}
    print("2/4 the trained models beside the base model and inference-time search")
    main_rows = evaluate("eval", [S.TOY_MODEL] + [os.path.join(d, "model") for d in runs.values()],
                         [f"--search={search}"])
    print("3/4 ablations (sharpen_sft, fixed steps): n, m, soft weights, official target, chain grad")
    abl = {}
    for n in ns:
        abl[f"n={n}"] = train(f"abl_n{n}", "--method=sharpen_sft", f"--n_traj={n}", f"--steps={ablation_steps}", "--eval_seeds=0")
    for m in ms:
        abl[f"m={m}"] = train(f"abl_m{m}", "--method=sharpen_sft", f"--m_steps={m}", f"--steps={ablation_steps}", "--eval_seeds=0")
    extensions = [("official target", ["--sft_target=official"]), ("lam=0.5 (z-scored)", ["--lam=0.5", "--normalize=True"]),
                  ("chain grad", ["--chain_grad=True"]), ("lam=inf (no selection)", ["--lam=inf"])]
    for tag, flags in extensions[:1] if quick else extensions:
        abl[tag] = train("abl_" + re.sub(r"\W+", "_", tag).strip("_"), "--method=sharpen_sft",
                         f"--steps={ablation_steps}", "--eval_seeds=0", *flags)
    abl_rows = evaluate("ablations", [os.path.join(d, "model") for d in abl.values()])
    print(f"4/4 reward hacking: {hack_methods} on {hack_reward}, gold tracked")
    hack = {m: train(f"hack_{m}", f"--method={m}", f"--reward={hack_reward}",
                     f"--nfe_budget={budget}", f"--eval_count={max(curve_evals, 4)}", f"--eval_seeds={curve_seeds}",
                     "--ckpt_interval=10") for m in hack_methods.split("+")}
    write_results(runs, main_rows, abl, abl_rows, hack)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {out}/results.md")


def amortisation_figure(rows, bon):
    """amortisation.png: the base model's best-of-N curve and each trained model as a level line; where a
    line crosses the curve is the N that model amortises."""
    import eval as E
    if not bon:
        return
    ns = [nfe // bon[0][0] for nfe, _ in bon]
    series = {"best-of-N (base)": [(n, g) for n, (_, g) in zip(ns, bon)]}
    series.update({r["name"]: [(ns[0], r["overall"]), (ns[-1], r["overall"])] for r in rows[1:]})
    E.plot(os.path.join(out, "amortisation.png"), series, "N (best-of-N of the base model, log)", "held-out gold")


def write_results(runs, main_rows, abl, abl_rows, hack):
    import eval as E
    md = [f"## Results (python reproduce.py{' --quick' if quick else ''})\n",
          f"Held-out prompts x {eval_seeds} seeds per row; training budget {budget} UNet passes per method "
          "(forward passes, with grad counted 3x; CFG off).\n", open(os.path.join(out, "eval", "results.md")).read()]
    base = main_rows[0]["overall"]
    bon = sorted((r["nfe_per_image"], r["overall"]) for r in main_rows if (r["search"] or "").startswith("bon"))
    md.append("\nAmortisation: the best-of-N budget at which the base model (verifier = gold) matches each "
              "trained model, at that model's NFE per image:\n")
    for r in main_rows[1:len(runs) + 1]:
        n = E.amortised_n([(x // bon[0][0], y) for x, y in bon], r["overall"]) if bon else None
        md.append(f"- {r['name']}: gold {r['overall']:.3f} ({r['overall'] - base:+.3f} vs base) -> "
                  + (f"best-of-{n:.1f}" if n else "below best-of-1") + "\n")
    amortisation_figure(main_rows[:len(runs) + 1], bon)
    md.append("\nAblations (sharpen_sft, same steps each):\n\n| run | gold | binding | counting | spatial | diversity |\n"
              "|---|---|---|---|---|---|\n")
    for tag, r in zip(abl, abl_rows):
        md.append(f"| {tag} | {r['overall']:.3f} | " + " | ".join(f"{v:.3f}" for v in r["per_skill"].values())
                  + f" | {r['diversity']:.3f} |\n")
    for m, d in hack.items():
        md.append(f"\nReward hacking ({m} on `{hack_reward}`; held-out, 2 seeds):\n\n| step | nfe | {hack_reward} | gold |\n|---|---|---|---|\n")
        for step, nfe, g, kv in evals(d):
            md.append(f"| {step} | {nfe} | {kv.get('heldout ' + hack_reward, '')} | {g:.4f} |\n")
        best = max(evals(d), key=lambda e: e[2])
        md.append(f"\nSelected by gold on held-out prompts: step {best[0]} (gold {best[2]:.4f}).\n")
    curves = {m: [(nfe, g) for _, nfe, g, _ in evals(d)] for m, d in runs.items()}
    E.plot(os.path.join(out, "convergence.png"), curves, "training UNet passes", "held-out gold (2 seeds)", logx=False)
    md.append("\nFigures: eval/reward_vs_nfe.png, convergence.png, amortisation.png\n")
    open(os.path.join(out, "results.md"), "w").write("".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
