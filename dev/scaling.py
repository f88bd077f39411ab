"""
Compute scaling: which training method comes closest, at 1x inference cost, to what search buys at Nx, as its
training compute grows. Each method trains from the base at k x the study's budget (train.py --nfe_budget: a run of
its own per multiple, its lr schedule over the longer run, not a checkpoint of the longest), then one eval.py scores
every run on the fixed held-out prompts (fidelity beside gold) with the N of the base's best-of-N it matches (95 %
bounds over prompts). Writes out/results.md (the table, each run's cost) and out/scaling.png (gold against training
UNet passes, a line per method, the base's best-of-N as levels).

    python dev/scaling.py --jobs=2      # the built-in DDIM model, every method at 1x, 3x, 10x (days on 2 cores)
    python dev/scaling.py --model=assets/toy-flow-model --out=out/scaling_flow --multiples=1+3 \
        --methods=sharpen_sft+sharpen_rlhf+grpo+diffusion_nft --jobs=2              # the flow model
    python dev/scaling.py --quick       # tiny settings, a minute (test_all.py runs it)

Resumable as dev/reproduce.py, whose stages it runs: a finished run is kept, an interrupted one continues from its
checkpoint, and the evaluation reruns only when the set of finished runs changed. --partial evaluates what has
finished so far (the longest runs take days) and leaves the rest for a later call.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce as RP  # noqa: E402  (its train / evaluate / finished stages; it puts the repo root on sys.path)

import figures as FIG  # noqa: E402
import models as M  # noqa: E402
import sample as S  # noqa: E402

# -----------------------------------------------------------------------------
out = "out/scaling"      # everything goes here
model = ""               # the base every run trains from ("" = the built-in toy model)
quick = False            # tiny settings: checks the pipeline, numbers mean nothing
budget = 184320          # the study's budget (dev/reproduce.py): 1x
multiples = "1+3+10"     # training budgets, in multiples of `budget`
methods = "sharpen_sft+sharpen_rlhf+sft+raft_rounds+diffusion_nft+grpo"
                         # grpo: ddpo with the round's reward std and the KL to the base (on a flow model: Flow-GRPO)
eval_seeds = 16          # seeds per held-out prompt (41 prompts x 16 = 656 images)
amortise = 16            # the base's candidates per (prompt, seed) for its best-of-N curve
hack = "grpo"            # reward hacking: this method on reproduce.py's hack_reward (toyclip) at the largest multiple,
                         # held-out gold tracked ("" = none)
hack_evals = 6           # held-out evaluations (2 seeds each) during the hacking run
jobs = 1                 # training runs side by side (each with cores / jobs threads)
partial = False          # evaluate the runs finished so far instead of waiting for all of them
# -----------------------------------------------------------------------------
FLAGS, METHOD = RP.FLAGS, RP.METHOD  # grpo: config/grpo.py, ddpo with the round's reward std and the KL to the base


def run_name(m, k):
    return f"{m}_x{k:g}"


def main():
    global out
    S.configure(globals(), sys.argv[1:])
    out = os.path.abspath(out)
    base = os.path.abspath(model) if model else M.TOY_MODEL
    M.check_model_folder(base)
    try:
        ks = [float(k) for k in str(multiples).split("+") if k]
    except ValueError:
        raise SystemExit(f"error: --multiples={multiples!r} must be '+'-separated numbers > 0")
    unknown = [m for m in RP.names(methods) if m not in (*FLAGS, *RP.FLOW, *RP.DEFAULTS)]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {', '.join(unknown)} "
                         f"(known: {', '.join(sorted({*FLAGS, *RP.FLOW, *RP.DEFAULTS}))})")
    if not ks or min(ks) <= 0:
        raise SystemExit(f"error: --multiples={multiples!r} must be '+'-separated numbers > 0")
    size = dict(budget=200, eval_seeds=1, amortise=2, hack_evals=1) if quick else {}
    # reproduce.py's stages read its globals: where, how many at once, the base
    RP.out, RP.quick, RP.jobs, RP.model, RP.BASE = out, quick, jobs, base if model else "", base
    RP.eval_seeds = size.get("eval_seeds", eval_seeds)
    RP.POOL = RP.ThreadPoolExecutor(jobs) if jobs > 1 else None
    os.makedirs(out, exist_ok=True)
    b = size.get("budget", budget)
    hacked = RP.train(f"hack_{hack}", *RP.flags(hack), f"--method={METHOD.get(hack, hack)}",
                      f"--nfe_budget={int(max(ks) * b)}", *RP.hack_flags(size.get("hack_evals", hack_evals)),
                      "--ckpt_interval=10") if hack else None
    runs = {}
    for k in sorted(ks, reverse=True):  # the longest first: the short ones fill the other job slots beside them
        for m in RP.names(methods):
            runs[m, k] = RP.train(run_name(m, k), *RP.flags(m), f"--method={METHOD.get(m, m)}", f"--nfe_budget={int(k * b)}",
                                  "--eval_seeds=0", "--ckpt_interval=10")
    done = [key for key, d in runs.items() if os.path.exists(os.path.join(d, "done"))]
    if not partial:
        RP.finished()
        done = list(runs)
    if not done:
        return print("nothing has finished yet")
    rows = RP.evaluate("eval", [base] + [os.path.join(runs[key], "model") for key in done],
                       [f"--amortise={size.get('amortise', amortise)}"])
    hack_done = hacked if hacked and os.path.exists(os.path.join(hacked, "done")) else None
    write(rows, {key: runs[key] for key in done}, b, hack_done)


def hours(d):
    """A run's training time: the sum of its logged step times (a resumed run's steps counted once)."""
    dt = {int(s): int(t) for s, t in re.findall(r"^step (\d+) \|.*\| dt (\d+)ms", open(os.path.join(d, "log.txt")).read(), re.M)}
    return sum(dt.values()) / 3.6e6


def write(rows, runs, b, hacked=None):
    """results.md and scaling.png from eval.py's rows (the base first) and its amortisation.json; the hacking run's
    evaluations from its log."""
    amo = json.load(open(os.path.join(out, "eval", "amortisation.json")))
    by, base = {r["name"]: r for r in rows}, rows[0]
    md = [f"## Compute scaling (python dev/scaling.py{' --quick' if quick else ''})\n\n",
          f"Base `{os.path.relpath(RP.BASE, RP.ROOT)}`: held-out gold {base['overall']:.3f} on {base['n']} images "
          f"(background {base['background']:.3f}, palette {base['palette']:.3f}); 1x = {b} training UNet passes. Δ: the "
          "paired difference from the base ± SE; N: the base's best-of-N (gold verifier) the model matches at 1x "
          "inference, with 95 % bounds over prompts.\n\n",
          "| method | budget | UNet passes | gold | Δ vs base ± SE | background | palette | denoise × | matches best-of-N "
          "| 95 % bounds | training time |\n|---|---|---|---|---|---|---|---|---|---|---|\n"]
    series = {}
    order = RP.names(methods)
    for (m, k), d in sorted(runs.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        r, a = by[run_name(m, k)], amo["models"].get(run_name(m, k), {})
        md.append(f"| {m} | {k:g}x | {r['train_nfe']} | {r['overall']:.3f} | {r['delta']:+.3f} ± {r['delta_se']:.3f} | "
                  f"{r['background']:.3f} | {r['palette']:.3f} | {r['denoise']:.1f} | {a.get('n', float('nan')):.2f} | "
                  f"{a.get('lo', float('nan')):.2f} – {a.get('hi', float('nan')):.2f} | {hours(d):.2f} h |\n")
        series.setdefault(m, []).append((r["train_nfe"], r["overall"]))
    curve = amo["curve"]
    md.append(f"\nBase best-of-N, N = 1..{len(curve)}: " + ", ".join(f"{v:.3f}" for v in curve) + "\n")
    FIG.scaling_figure(os.path.join(out, "scaling.png"), series, sorted({k for _, k in runs}), b, curve)
    if hacked:
        md.append(f"\nReward hacking: {hack} trained on {RP.hack_reward} for {max(k for _, k in runs):g}x, held-out "
                  f"({RP.curve_seeds()} seeds):\n\n"
                  f"| step | training UNet passes | {RP.hack_reward} | gold |\n|---|---|---|---|\n")
        md += [f"| {step} | {nfe} | {kv.get('heldout ' + RP.hack_reward, '')} | {g:.4f} |\n"
               for step, nfe, g, kv in RP.evals(hacked)]
    open(os.path.join(out, "results.md"), "w").write("".join(md))
    print("".join(md) + f"\nwrote {out}/results.md, scaling.png")


if __name__ == "__main__":
    main()
