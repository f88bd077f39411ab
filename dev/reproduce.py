"""
Reproduce the results on the toy world, end to end and resumable: every training method at equal UNet
compute, inference-time search against them, the paper's n/m ablations, our extensions (soft weights,
exact vs official target, backprop through the chain) and reward hacking.

    python dev/reproduce.py            # ~40 min on 2 CPU cores -> out/reproduce/results.md + PNG figures
    python dev/reproduce.py --quick    # tiny settings, a few minutes (test_all.py runs it)
    python dev/reproduce.py --redraw=docs/reproduce.md --fig_dir=docs/fig   # figures from a results.md

Each stage is a train.py / eval.py subprocess that writes its own folder under `out` (relative to the
working directory); a stage whose output exists is skipped and an interrupted training run continues from
its checkpoint, so re-running the command after a crash picks up where it stopped. Every train.py run
gets config/reproduce.py (the settings these results were made with; --quick adds
config/reproduce_quick.py), then its stage's flags. Held-out prompts and seeds are fixed (eval.py).
docs/reproduce.md and docs/fig/ are committed copies of a full run's results.md and figures.
"""
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # python dev/reproduce.py from anywhere

import eval as E  # noqa: E402
import sample as S  # noqa: E402

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
redraw = ""              # a results.md: only redraw its figures (amortisation, convergence, reward_vs_nfe)
fig_dir = ""             # where redraw writes them ("" = beside the results.md)
# -----------------------------------------------------------------------------


def sh(script, *args, log=None):
    """Run one of our scripts from the repo root; its output goes to `log` (and its tail into the error on failure)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    t0 = time.time()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if p.returncode:
        tail = open(log).read()[-1500:] if log else ""
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}); see {log}\n{tail}")
    print(f"  {script} {' '.join(map(str, args))[:100]} ({time.time() - t0:.0f}s)", flush=True)


def train(name, *args):
    """train.py into out/name unless it already finished; resume it if it was interrupted."""
    d = os.path.join(out, name)
    if os.path.exists(os.path.join(d, "model", "unet")) and os.path.exists(os.path.join(d, "done")):
        return d
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(d, "ckpt.pt")) else []
    os.makedirs(d, exist_ok=True)
    configs = [os.path.join(ROOT, "config", f) for f in ["reproduce.py"] + ["reproduce_quick.py"] * quick]
    sh("train.py", *configs, f"--out_dir={d}", *args, *resume, log=os.path.join(d, "stdout.txt"))
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
        tiny = ["--num_steps=4", "--per_skill=1"] if quick else []
        sh("eval.py", f"--models={'+'.join(models)}", f"--seeds={eval_seeds}", f"--out_dir={d}", *tiny, *extra,
           log=os.path.join(out, f"{name}.txt"))
    return json.load(open(os.path.join(d, "results.json")))["rows"]


def main():
    global out, budget, ablation_steps, eval_seeds, search, curve_evals, methods
    S.configure(globals(), sys.argv[1:])
    if redraw:
        return redraw_figures(redraw, fig_dir or os.path.dirname(os.path.abspath(redraw)))
    out = os.path.abspath(out)
    ns, ms = (1, 2, 3, 4, 8), (1, 2, 3, 4, 8)
    if quick:
        budget, ablation_steps, eval_seeds, ns, ms, curve_evals = 400, 2, 1, (2,), (1,), 1
        search = "bon1+bon2+noise1x2+greedy2"
        methods = "sharpen_rlhf+ddpo"  # one of each kind: the other methods share their code paths here
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


# -----------------------------------------------------------------------------
# figures: drawn from the numbers results.md holds, so that its committed copy redraws them

def amortised_n(bon, target):
    """The N at which best-of-N (points (N, reward), increasing N) first reaches `target`, log-linearly
    interpolated; None if it never does."""
    for (n0, r0), (n1, r1) in zip(bon, bon[1:]):
        if r0 >= target:
            return n0
        if r1 >= target:
            return 2 ** (math.log2(n0) + (target - r0) / (r1 - r0) * (math.log2(n1) - math.log2(n0)))
    return bon[0][0] if bon and bon[0][1] >= target else None


def amortisation_figure(path, rows):
    """The base model's best-of-N curve against NFE per image and each trained model as a level line;
    where a line crosses the curve is the N that model amortises. rows: eval.py's (name, search, overall,
    nfe_per_image), the base model first."""
    bon = sorted((r["nfe_per_image"], r["overall"]) for r in rows if (r["search"] or "").startswith("bon"))
    if not bon:
        return
    trained = {r["name"]: r["overall"] for r in rows[1:] if not r["search"]}
    E.line_plot(path, {"bon": bon}, "NFE per image (UNet passes, log scale)", "held-out gold reward",
                xticks=E.nfe_ticks([n for n, _ in bon]), levels=trained,
                top_axis=("N (best-of-N of the base model)", bon[0][0], [n // bon[0][0] for n, _ in bon]))


def convergence_figure(path, curves):
    """curves {method: [(training UNet passes, held-out gold), ...]}."""
    E.line_plot(path, curves, "training UNet passes (forward passes, grad counted 3x)", "held-out gold reward (2 seeds)")


def write_results(runs, main_rows, abl, abl_rows, hack):
    md = [f"## Results (python dev/reproduce.py{' --quick' if quick else ''})\n",
          f"Held-out prompts x {eval_seeds} seeds per row; training budget {budget} UNet passes per method "
          "(forward passes, with grad counted 3x; CFG off).\n\n", open(os.path.join(out, "eval", "results.md")).read()]
    base = main_rows[0]["overall"]
    bon = sorted((r["nfe_per_image"], r["overall"]) for r in main_rows if (r["search"] or "").startswith("bon"))
    md.append("\nAmortisation: the best-of-N budget at which the base model (verifier = gold) matches each "
              "trained model, at that model's NFE per image:\n")
    for r in main_rows[1:len(runs) + 1]:
        n = amortised_n([(x // bon[0][0], y) for x, y in bon], r["overall"]) if bon else None
        md.append(f"- {r['name']}: gold {r['overall']:.3f} ({r['overall'] - base:+.3f} vs base) -> "
                  + (f"best-of-{n:.1f}" if n else "below best-of-1") + "\n")
    amortisation_figure(os.path.join(out, "amortisation.png"), main_rows)
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
    md.append("\nConvergence (held-out gold during each main run):\n\n| method | training UNet passes | gold |\n|---|---|---|\n")
    md += [f"| {m} | {nfe} | {g:.4f} |\n" for m, c in curves.items() for nfe, g in c]
    convergence_figure(os.path.join(out, "convergence.png"), curves)
    md.append("\nFigures: eval/reward_vs_nfe.png, convergence.png, amortisation.png\n")
    open(os.path.join(out, "results.md"), "w").write("".join(md))
    print("".join(md))


def tables(path):
    """Every markdown table of a file: [(header cells, [row cells, ...])]."""
    found, lines = [], open(path, encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            cells = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]  # noqa: E731
            head, j = cells(lines[i]), i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            found.append((head, [cells(l) for l in lines[i + 2:j]]))
            i = j
        else:
            i += 1
    return found


def redraw_figures(results, figs):
    """amortisation.png, convergence.png and reward_vs_nfe.png from a results.md this script wrote."""
    rows, curves = [], {}
    for head, body in tables(results):
        if head[0] == "model" and "NFE/image" in head:  # eval.py's table
            for c in body:
                last = c[0].split()[-1]
                how = last if len(c[0].split()) > 1 and re.fullmatch(r"bon\d+|noise\d+x\d+|greedy\d+", last) else None
                rows.append(dict(name=c[0], search=how, overall=float(c[head.index("gold")]),
                                 nfe_per_image=int(c[head.index("NFE/image")])))
        elif head == ["method", "training UNet passes", "gold"]:
            for m, nfe, g in body:
                curves.setdefault(m, []).append((float(nfe), float(g)))
    if not rows or not curves:
        raise SystemExit(f"error: {results} lacks eval.py's table or the Convergence table")
    os.makedirs(figs, exist_ok=True)
    E.reward_vs_nfe_figure(os.path.join(figs, "reward_vs_nfe.png"), rows)
    amortisation_figure(os.path.join(figs, "amortisation.png"), rows)
    convergence_figure(os.path.join(figs, "convergence.png"), curves)
    print(f"wrote {figs}/reward_vs_nfe.png, amortisation.png, convergence.png from {results}")


if __name__ == "__main__":
    main()
