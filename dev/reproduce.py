"""
Reproduce the results on the toy world, end to end and resumable. The question: does training on selected
trajectories buy, at 1x inference cost, what search buys at Nx? Every method at equal UNet compute, each with its
own settings (train.py's defaults; raft config/raft.py's; sharpen_sft and its controls config/sharpen_sft.py's;
plain sft also at sharpen_sft's steps, half its compute: what the selection adds per step), three training seeds
for the central ones; 41 held-out prompts x 16 seeds per model; the base model's best-of-N curve with the gold
verifier and the N each trained model matches; the paper's ablations (n, m, path sum vs last step, and the start
range on sharpen_rlhf; lambda on sharpen_sft) at the same budget, and two tests of sharpen_sft's selection where it
can choose (misaligned pretraining pairs; targets that are the picked trajectory's own outcome), each beside its
control without selection; reward hacking on the learned toyclip proxy with gold tracked.

    python dev/reproduce.py --jobs=2   # ~8 h on 2 CPU cores -> out/reproduce/results.md + figures (two training
                                       # runs at a time, a thread each; 6.5 h before the raft_rounds rows and the
                                       # selection tests, whose ~8 runs add ~3 h of training steps, estimated per run)
    python dev/reproduce.py --quick    # tiny settings, a few minutes (test_all.py runs it)
    python dev/reproduce.py --redraw=docs/reproduce.md --fig_dir=docs/fig   # figures from a results.md
    python dev/reproduce.py --model=assets/toy-flow-model --out=out/reproduce_flow --methods=sharpen_rlhf+sharpen_sft \
        --seeded=sharpen_rlhf+sharpen_sft --ablations= --sft_ablations= --hack_methods= --search= --amortise=4 --jobs=2
                                       # two methods, 3 seeds, on the flow toy model (or any model folder)

Each stage is a train.py / eval.py subprocess that writes its own folder under `out` (relative to the
working directory); a stage whose output exists is skipped and an interrupted training run continues from
its checkpoint, so re-running the command after a crash picks up where it stopped. results.md is written
once the main evaluation is done (the headline tables) and again, whole, at the end. --quick puts
config/reproduce_quick.py into every train.py run, after its config files and before its flags. Held-out
prompts and seeds are fixed (eval.py); no setting here was chosen on them. docs/reproduce.md and docs/fig/
are committed copies of a full run's output.
"""
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # python dev/reproduce.py from anywhere

import figures as FIG  # noqa: E402
import models as M  # noqa: E402
import sample as S  # noqa: E402

# -----------------------------------------------------------------------------
out = "out/reproduce"    # everything goes here
model = ""               # the model every run trains from and every table starts with ("" = the built-in toy model)
quick = False            # tiny settings: checks the pipeline, numbers mean nothing
budget = 184320          # UNet cost of every training run (train.py nfe_budget: forward passes, grad x3):
                         # config/sharpen_sft.py's 480 steps
methods = "sharpen_rlhf+sharpen_sft+sft+raft+raft_rounds+raft_first+diffusion_dpo+ddpo+grpo+diffusion_nft+continued"
                         # raft: config/raft.py; raft_rounds: config/raft_rounds.py; raft_first: the same, unselected;
                         # grpo: config/grpo.py; diffusion_nft: config/diffusion_nft.py
seeded = "sharpen_rlhf+sharpen_sft+sft+raft_rounds"  # these are trained with seeds 1 and 2 as well
ablations = "n_traj=2+n_traj=5+m_steps=1+m_steps=5+score_steps=last+start_range=0.05:0.15"
                         # sharpen_rlhf, one change each; the last starts at steps 1-3 only (dev/selection.py)
sft_ablations = ("lam=0.1+lam=inf+lam=0.3,sft_data=alttext,sft_weights=step+lam=inf,sft_data=alttext,sft_weights=step"
                 "+lam=0,sft_target=final,replay=16+lam=inf,sft_target=final,replay=16")
                         # sharpen_sft, one change each (a change: ','-separated settings): the path-integral temperature
                         # (Eq. 9; sharpen_rlhf trains best vs worst and has none): soft weights, and uniform ones (no
                         # selection); selection among the misaligned pretraining pairs, weights across the step; each
                         # trajectory's own final image as its target, pretraining scenes replayed. A change that starts
                         # lam=x is also paired with the same change at lam=inf, its control without selection
eval_seeds = 16          # seeds per held-out prompt in the final tables (41 prompts x 16 = 656 images)
amortise = 16            # candidates per (prompt, seed) for the base model's best-of-N curve (N = 1..amortise)
search = "noise1x3+greedy2"  # other inference-time search rows beside best-of-N
curve_evals = 4          # held-out evaluations during each main run (2 seeds each): the convergence figure
hack_reward = "toyclip"  # reward hacking: hack_methods on this learned reward for hack_budget x budget, gold tracked
hack_methods = "sharpen_rlhf"
hack_budget = 3
hack_evals = 6           # held-out evaluations during the hacking run (at least curve_evals)
jobs = 1                 # training runs side by side, each with cores / jobs torch threads (2 x 1 thread on 2 cores
                         # is ~12 % faster than 1 x 2); the evaluations run one at a time on every core
redraw = ""              # a results.md: only redraw its figures (amortisation, convergence, reward_vs_nfe)
fig_dir = ""             # where redraw writes them ("" = beside the results.md)
# -----------------------------------------------------------------------------
SFT_CONFIG = os.path.join(ROOT, "config", "sharpen_sft.py")
FLAGS = {  # each method's settings; the controls share sharpen_sft's so that each is one paired difference
    "sharpen_sft": [SFT_CONFIG],
    "raft": [os.path.join(ROOT, "config", "raft.py")],  # its lr chosen on train prompts (train.py's collapses it)
    "sft": [SFT_CONFIG, "--sft_t=sampler"],  # plain SFT: random noise at the same noise levels
    "sft_te": [SFT_CONFIG, "--sft_t=sampler", "--train_text_encoder=True"],  # and the text encoder trained with it
    "continued": [SFT_CONFIG],  # more pretraining (its alt-text captions): "more training"
    "raft_rounds": [os.path.join(ROOT, "config", "raft_rounds.py")],  # RAFT's rounds of a pool, scenes replayed
    "raft_first": [os.path.join(ROOT, "config", "raft_rounds.py"), "--raft_select=first"],  # its pools unselected
    "diffusion_nft": [os.path.join(ROOT, "config", "diffusion_nft.py")],  # its lr chosen on train prompts
    "diffusion_nft_slow": [os.path.join(ROOT, "config", "diffusion_nft.py"), "--lr=3e-5"],  # its runner-up lr there: for
    # the longer runs, where at 1e-4 its train-prompt rollout reward falls from step 28 on
    "grpo": [os.path.join(ROOT, "config", "grpo.py")],  # ddpo with group advantages and the KL (Flow-GRPO's recipe)
}
METHOD = {"raft_rounds": "raft", "raft_first": "raft", "grpo": "ddpo", "sft_te": "sft",  # rows that are another
          "diffusion_nft_slow": "diffusion_nft"}  # method's settings: train.py's method
FLOW = {m: [os.path.join(ROOT, "config", f"flow_{m}.py")]  # on a flow model instead of FLAGS (grpo: Flow-GRPO, its SDE)
        for m in ("sharpen_sft", "sharpen_rlhf", "grpo", "diffusion_nft")}
DEFAULTS = ("sharpen_rlhf", "diffusion_dpo", "ddpo")  # methods trained on train.py's defaults: no FLAGS entry
OWN_SAMPLER = {"ddpo": ["--eta=1"], "grpo": ["--eta=1"]}  # methods trained on another sampler than the evaluation's: eval.py flags for it
BASE = M.TOY_MODEL  # model's folder
POOL, QUEUED, LOCK = None, [], threading.Lock()  # with jobs > 1: the training runs in flight, and out/wall.json's lock


try:  # loaded here, not in the forked child: an import there can deadlock while the pool's threads run
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    LIBC = None  # not Linux: a killed script leaves its child running, as before


def die_with_parent():
    """In the child before it runs (Linux): SIGTERM when the thread that started it dies, so a killed reproduce.py /
    study_runs.py takes its train.py with it instead of leaving it running, holding its out_dir's lock."""
    if LIBC is not None:
        LIBC.prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG


def sh(script, *args, log=None):
    """Run one of our scripts from the repo root; its output goes to `log` (and its tail into the error on
    failure). Its wall time is added to out/wall.json under the log's name."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    t0 = time.time()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=die_with_parent)
    if p.returncode:
        tail = open(log).read()[-1500:] if log else ""
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}); see {log}\n{tail}")
    path, key = os.path.join(out, "wall.json"), os.path.relpath(log or script, out)
    with LOCK:
        wall = json.load(open(path)) if os.path.exists(path) else {}
        wall[key] = wall.get(key, 0) + time.time() - t0
        json.dump(wall, open(path, "w"), indent=1)
    print(f"  {script} {' '.join(map(str, args))[:100]} ({time.time() - t0:.0f}s)", flush=True)


def train(name, *args):
    """train.py into out/name unless it already finished; resume it if it was interrupted. With jobs > 1 it is
    queued and this returns at once: finished() waits for it."""
    d = os.path.join(out, name)
    if os.path.exists(os.path.join(d, "model", "unet")) and os.path.exists(os.path.join(d, "done")):
        return d
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(d, "ckpt.pt")) else []
    os.makedirs(d, exist_ok=True)
    tiny = [os.path.join(ROOT, "config", "reproduce_quick.py")] if quick else []
    files = [a for a in args if not a.startswith("--")]  # config files first, the tiny settings over them, then flags
    extra = [f"--threads={max(1, (os.cpu_count() or 1) // jobs)}"] if jobs > 1 else []
    extra += [f"--model={BASE}"] if model else []  # the run starts from model
    run = lambda: (sh("train.py", *files, *tiny, *[a for a in args if a.startswith("--")], f"--out_dir={d}",  # noqa: E731
                      *resume, *extra, log=os.path.join(d, "stdout.txt")), open(os.path.join(d, "done"), "w").close())
    if POOL:
        QUEUED.append((d, POOL.submit(run)))
    else:
        run()
    return d


def finished(*dirs):
    """Wait for the queued training runs (those in `dirs`, or all); a failed one raises its error here."""
    for d, f in QUEUED:
        if not dirs or d in dirs:
            try:
                f.result()
            except BaseException:  # a failed run (or Ctrl-C) starts no further runs; those in flight end first
                POOL.shutdown(wait=False, cancel_futures=True)
                raise


def flags(method):
    """The method's train.py settings: FLAGS, or FLOW's on a flow model."""
    return FLOW[method] if method in FLOW and M.folder_is_flow(BASE) else FLAGS.get(method, [])


def curve_seeds():
    """Seeds per held-out prompt of the gold curves logged during training (curve and hacking runs): 2, 1 with quick."""
    return 1 if quick else 2


def hack_flags(evals):
    """A reward-hacking run's train.py flags: trained on hack_reward, its held-out hack_reward and gold logged `evals`
    times on curve_seeds() seeds per prompt."""
    return [f"--reward={hack_reward}", f"--eval_count={evals}", f"--eval_seeds={curve_seeds()}"]


def method_run(name, method, seed=0, *extra, steps=0, nfe=0):
    """One training run of `method` at the budget (or at `nfe` UNet passes, or for `steps` optimizer steps): seed 0
    is train.py's default seed, others --seed=s."""
    return train(name, *flags(method), f"--method={METHOD.get(method, method)}", f"--seed={seed or 1337}",
                 f"--steps={steps}" if steps else f"--nfe_budget={nfe or budget}", *extra)


def evals(d):
    """The eval lines of a train.py log: [(step, nfe, gold, {extra: value})], one per step (a resumed run logs
    again from its checkpoint: the last line of a step wins)."""
    rows = {}
    for line in open(os.path.join(d, "log.txt")):
        if line.startswith("eval "):
            kv = dict(re.findall(r"\| ([\w ]+?) ([-\d.]+)(?= \||$)", line.strip()))
            rows[int(kv["step"])] = (int(kv["step"]), int(kv["nfe"]), float(kv["heldout gold"]), kv)
    return [rows[k] for k in sorted(rows)]


def evaluate(name, models, extra=()):
    """eval.py over the fixed held-out list -> its rows (cached in out/name/results.json; rerun if the models change:
    compared by each path's last two parts, so that a finished study read from another checkout is not rerun)."""
    d, path = os.path.join(out, name), os.path.join(out, name, "results.json")
    done = json.load(open(path)) if os.path.exists(path) else None
    tails = lambda paths: [os.path.join(*os.path.normpath(p).split(os.sep)[-2:]) for p in paths]  # <run>/model
    if done is None or tails(done["config"]["models"].split("+")) != tails(models):  # not run, or stale: run
        # quick: 3 images a row, on 1 thread (2 threads beside another busy process wait on each other at every op)
        tiny = ["--num_steps=4", "--per_skill=1", "--threads=1"] if quick else []
        sh("eval.py", f"--models={'+'.join(models)}", f"--seeds={eval_seeds}", f"--out_dir={d}", "--rewards=toyclip",
           *tiny, *extra, log=os.path.join(out, f"{name}.txt"))
        done = json.load(open(path))
    return done["rows"]


def main():
    global out, BASE, POOL
    S.configure(globals(), sys.argv[1:])
    if redraw:
        return redraw_figures(redraw, fig_dir or os.path.dirname(os.path.abspath(redraw)))
    out, BASE = os.path.abspath(out), os.path.abspath(model) if model else M.TOY_MODEL
    if model:
        M.check_model_folder(BASE)
    if quick:  # tiny settings, except those given as flags
        given = {a[2:].split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
        tiny = dict(budget=200, eval_seeds=1, amortise=2, search="greedy2", curve_evals=0, hack_evals=1, seeded="raft",
                    methods="sharpen_rlhf+sharpen_sft+sft+raft+ddpo", ablations="n_traj=2", sft_ablations="lam=inf")
        globals().update({k: v for k, v in tiny.items() if k not in given})
    os.makedirs(out, exist_ok=True)
    POOL = ThreadPoolExecutor(jobs) if jobs > 1 else None
    t0 = time.time()
    print(f"1/5 every method at equal compute ({budget} UNet passes each, grad x3); seeds 1, 2 of {seeded} "
          f"({jobs} at a time)")
    curve = [f"--eval_count={curve_evals}", f"--eval_seeds={curve_seeds()}", "--ckpt_interval=10"]
    runs = {m: method_run(m, m, 0, *curve) for m in names(methods)}
    seeds = {f"{m}_s{s}": method_run(f"{m}_s{s}", m, s, "--eval_seeds=0", "--ckpt_interval=10")
             for s in (1, 2) for m in names(seeded)}
    if "sharpen_sft" in runs and "sft" in runs:  # and at sharpen_sft's steps (equal compute gives sft twice the steps)
        finished(runs["sharpen_sft"])
        runs["sft_steps"] = method_run("sft_steps", "sft", 0, *curve, steps=evals(runs["sharpen_sft"])[-1][0])
    finished()
    print(f"2/5 held-out evaluation, the base model's best-of-N ({amortise} candidates) and search; the methods trained "
          "with another sampler with their own too; results.md without the ablations")
    models = [BASE] + [os.path.join(d, "model") for d in list(runs.values()) + list(seeds.values())]
    main_rows = evaluate("eval", models, [f"--amortise={amortise}", f"--search={search}"])
    own = {m: evaluate(f"eval_{m}_own_sampler", [BASE, os.path.join(runs[m], "model")], flags)
           for m, flags in OWN_SAMPLER.items() if m in runs}
    write_results(runs, seeds, main_rows, own)  # the headline tables now; the rest follows
    print(f"3/5 ablations of sharpen_rlhf ({ablations.replace('+', ', ')}) and sharpen_sft "
          f"({sft_ablations.replace('+', ', ')}); reward hacking: {hack_methods} on "
          f"{hack_reward} for {hack_budget}x the budget, gold tracked ({jobs} at a time)")
    # the long hacking run first: the ablations fill the other job slots beside it
    hack = {m: train(f"hack_{m}", *flags(m), f"--method={METHOD.get(m, m)}", f"--nfe_budget={hack_budget * budget}",
                     *hack_flags(max(curve_evals, hack_evals)), "--ckpt_interval=10") for m in names(hack_methods)}
    abl = {}  # "method change" -> its run; each method's own default run first: the reference of its changes
    for m, changes, prefix in (("sharpen_rlhf", ablations, "abl_"), ("sharpen_sft", sft_ablations, "abl_sft_")):
        if names(changes):
            abl[m] = runs.get(m) or method_run(m, m, 0, *curve)
            abl.update({f"{m} {a}": method_run(prefix + re.sub(r"\W+", "_", a), m, 0, *[f"--{x}" for x in a.split(",")],
                                               "--eval_seeds=0",
                                               "--ckpt_interval=10") for a in names(changes)})
    finished()
    print("4/5 held-out evaluation of the ablations")
    abl_rows = evaluate("ablations", [BASE] + [os.path.join(d, "model") for d in abl.values()]) if abl else []
    print("5/5 what the selection can carry (dev/selection.py, train prompts), results.md and figures")
    sel = [selection(f"selection_n{n}", f"--n_traj={n}", f"--prompts={p}") for n, p in ((3, 256), (8, 128))[:1 + (not quick)]]
    write_results(runs, seeds, main_rows, own, abl, abl_rows, hack, sel)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {out}/results.md")


# -----------------------------------------------------------------------------
# figures: drawn from the numbers results.md holds, so that its committed copy redraws them

def convergence_figure(path, curves):
    """curves {method: [(training UNet passes, held-out gold), ...]}."""
    FIG.line_plot(path, curves, "training UNet passes (forward passes, grad counted 3x)", "held-out gold reward (2 seeds)")


def names(plus):
    """'a+b' -> ['a', 'b']; '' -> []."""
    return [x for x in plus.split("+") if x]


def paired(r, ref):
    """Mean and SE of eval rows r - ref, image by image (the same prompts and seeds)."""
    return mean_se([a - b for a, b in zip(r["gold_per_image"], ref["gold_per_image"])])


def mean_se(values):
    """Mean and standard error of the mean (nan for one value)."""
    m, n = sum(values) / len(values), len(values)
    return m, (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")


def selection(name, *args):
    """dev/selection.py's tables (its output from the first table on), cached in out/name.md."""
    path = os.path.join(out, f"{name}.md")
    if not os.path.exists(path):
        sh("dev/selection.py", *args, *([f"--model={BASE}"] if model else []),
           *(["--prompts=4", "--num_steps=4", "--threads=1"] if quick else []), log=path + ".part")
        os.replace(path + ".part", path)
    text = open(path).read()
    return text[text.index("| statistic"):]


def write_results(runs, seeds, main_rows, own, abl=None, abl_rows=None, hack=None, sel=()):
    """results.md and its figures; without abl (the ablations still to run) it says so in their place."""
    ev = os.path.join(out, "eval")
    amo = json.load(open(os.path.join(ev, "amortisation.json")))
    wall = json.load(open(os.path.join(out, "wall.json")))  # scripts' run times (a resumed run: its last part only)
    logs = {os.path.join(d, "log.txt") for runs_ in (runs, seeds, abl or {}, hack or {}) for d in runs_.values()}
    steps_ms = [int(t) for f in logs if os.path.exists(f) for t in re.findall(r"\| dt (\d+)ms", open(f).read())]
    train_h = sum(steps_ms) / 3.6e6
    eval_h = sum(v for k, v in wall.items() if not k.endswith("stdout.txt")) / 3600
    by = {r["name"]: r for r in main_rows if not r["search"]}
    base, nfe1 = main_rows[0], main_rows[0]["nfe_per_image"]
    md = [f"## Results (python dev/reproduce.py{' --quick' if quick else ''})\n\n",
          f"Training budget {budget} UNet passes per run (forward passes, grad counted 3x); held-out prompts x "
          f"{eval_seeds} seeds per row. Time: {train_h:.1f} h of training steps (the sum of every run's logged step "
          f"times, resumed parts included) and {eval_h:.1f} h of evaluation (out/wall.json).\n\n",
          open(os.path.join(ev, "results.md")).read()]
    md.append(f"\nThree training seeds (Δ: paired difference from the base ± SE over {base['n']} images; "
              "mean: over the seeds ± their SE):\n\n| method | seed 0 | seed 1 | seed 2 | mean |\n|---|---|---|---|---|\n")
    for m in names(seeded):
        three = [m, f"{m}_s1", f"{m}_s2"]
        cells = [f"{by[n]['delta']:+.3f} ± {by[n]['delta_se']:.3f}" if n in by else "—" for n in three]
        mean, se = mean_se([by[n]["delta"] for n in three if n in by])
        md.append(f"| {m} | " + " | ".join(cells) + f" | {mean:+.3f} ± {se:.3f} |\n")
    md.append("\nPaired differences between methods (seed 0, same images):\n\n| comparison | Δ ± SE |\n|---|---|\n")
    for a, b in [("sharpen_sft", "sft_steps"), ("sharpen_sft", "sft"), ("sharpen_rlhf", "raft"), ("sharpen_sft", "raft"),
                 ("sharpen_rlhf", "raft_rounds"), ("raft_rounds", "raft_first"), ("raft_rounds", "raft"),
                 ("sharpen_rlhf", "sharpen_sft"), ("sft", "continued"), ("raft", "continued")]:
        if a in by and b in by:
            m, se = paired(by[a], by[b])
            md.append(f"| {a} − {b} | {m:+.3f} ± {se:.3f} |\n")
    for m, (b, r) in own.items():
        md.append(f"\n{m} evaluated with the sampler it trains with ({' '.join(OWN_SAMPLER[m])}; the base with the same; "
                  f"Δ paired over {b['n']} images):\n\n| sampler | base | {m} | Δ ± SE |\n|---|---|---|---|\n"
                  f"| evaluation default | {base['overall']:.3f} | {by[m]['overall']:.3f} | {by[m]['delta']:+.3f} ± {by[m]['delta_se']:.3f} |\n"
                  f"| {' '.join(OWN_SAMPLER[m])} | {b['overall']:.3f} | {r['overall']:.3f} | {r['delta']:+.3f} ± {r['delta_se']:.3f} |\n")
    md.append(f"\nAmortisation: the N at which the base model's best-of-N (gold verifier, N x {nfe1} NFE) matches each "
              "trained model at 1x, with 95 % bounds (1,000 resamples of the prompts); paired: the N at which it reaches "
              "best-of-1 plus the model's paired Δ from the base (the shared seeds' luck left out):\n\n"
              "| model | gold | matches best-of-N | 95 % bounds | paired: best-of-1 + Δ | 95 % bounds |\n|---|---|---|---|---|---|\n")
    md += [f"| {k} | {by[k]['overall']:.3f} | {a['n']:.2f} | {a['lo']:.2f} – {a['hi']:.2f} | " + (
        f"{a['n_paired']:.2f} | {a['lo_paired']:.2f} – {a['hi_paired']:.2f} |\n" if "n_paired" in a else "— | — |\n")
        for k, a in amo["models"].items()]
    md.append(f"\nBase model best-of-N, N = 1..{len(amo['curve'])}: " + ", ".join(f"{v:.3f}" for v in amo["curve"]) + "\n")
    md.append("\nAblations, reward hacking and the selection tables: not run yet (dev/reproduce.py adds them).\n"
              if abl is None else "" if not abl_rows else f"\nAblations (each method at {budget} UNet passes with one change from its default "
              "run; Δ: paired differences ± SE over the same images):\n\n| run | gold | Δ vs base ± SE | Δ vs its default "
              "± SE | binding | counting | spatial | diversity | palette | denoise × |\n|---|---|---|---|---|---|---|---|---|---|\n")
    tagged = dict(zip(["base", *(abl or ())], abl_rows or ()))  # "method change" rows are paired with "method"'s
    for tag, r in tagged.items():
        delta = "—" if r["delta"] is None else f"{r['delta']:+.3f} ± {r['delta_se']:.3f}"
        vs = "{:+.3f} ± {:.3f}".format(*paired(r, tagged[tag.split()[0]])) if " " in tag else "—"
        md.append(f"| {tag} | {r['overall']:.3f} | {delta} | {vs} | " + " | ".join(f"{v:.3f}" for v in r["per_skill"].values())
                  + f" | {r['diversity']:.3f} | " + " | ".join("—" if r.get(k) is None else f"{r[k]:.3f}"  # (fidelity.py;
                                                           for k in ("palette", "denoise")) + " |\n")  # older runs: —)
    controls = {t.split(" ", 1)[1].split(",", 1)[1]: t for t in tagged if " lam=inf," in t}  # the rest -> control
    tests = [(t, controls[rest]) for t in tagged if " lam=" in t and "," in t and t not in controls.values()
             for rest in [t.split(" ", 1)[1].split(",", 1)[1]] if rest in controls]
    md += ["\nSelection against no selection (each change beside the same change at lam=inf; paired ± SE):\n\n"
           "| change | Δ vs its lam=inf control |\n|---|---|\n"] if tests else []
    md += ["| {} | {:+.3f} ± {:.3f} |\n".format(t, *paired(tagged[t], tagged[c])) for t, c in tests]
    for m, d in (hack or {}).items():
        md.append(f"\nReward hacking ({m} on `{hack_reward}`; held-out, {curve_seeds()} seeds):\n\n| step | nfe | {hack_reward} | gold |\n|---|---|---|---|\n")
        for step, nfe, g, kv in evals(d):
            md.append(f"| {step} | {nfe} | {kv.get('heldout ' + hack_reward, '')} | {g:.4f} |\n")
        best = max(evals(d), key=lambda e: e[2])
        md.append(f"\nSelected by gold on held-out prompts: step {best[0]} (gold {best[2]:.4f}).\n")
    curves = {m: [(nfe, g) for _, nfe, g, _ in evals(d)] for m, d in runs.items()}
    md.append("\nConvergence (held-out gold during each main run):\n\n| method | training UNet passes | gold |\n|---|---|---|\n")
    md += [f"| {m} | {nfe} | {g:.4f} |\n" for m, c in curves.items() for nfe, g in c]
    for (n, p), table in zip(((3, 256), (8, 128)), sel):
        md.append(f"\nWhat the selection can carry (dev/selection.py --n_traj={n}: {4 if quick else p} train prompts; "
                  "each trajectory sampled on to the end, G its final gold):\n\n" + table)
    md.append("\nFigures: reward_vs_nfe.png, convergence.png, amortisation.png\n")
    open(os.path.join(out, "results.md"), "w").write("".join(md))
    print("".join(md))
    redraw_figures(os.path.join(out, "results.md"), out)  # the figures from the numbers above, as a committed copy's


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
    text = open(results, encoding="utf-8").read()
    rows, curves, levels = [], {}, {}
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
        elif head[:3] == ["model", "gold", "matches best-of-N"]:
            levels = {c[0]: float(c[1]) for c in body}
    found = re.search(r"Base model best-of-N, N = 1\.\.\d+: ([-\d., ]+)", text)
    if not rows or not curves or not found:
        raise SystemExit(f"error: {results} lacks eval.py's table, the Convergence table or the best-of-N curve")
    curve, nfe1 = [float(v) for v in found.group(1).split(",")], rows[0]["nfe_per_image"]
    os.makedirs(figs, exist_ok=True)
    bon = [dict(name=f"bon{n}", search=f"bon{n}", overall=v, nfe_per_image=n * nfe1)
           for n, v in enumerate(curve, 1) if n & (n - 1) == 0]
    FIG.reward_vs_nfe_figure(os.path.join(figs, "reward_vs_nfe.png"),
                           [r for r in rows if r["search"] or r["name"] in curves or r is rows[0]] + bon)
    FIG.amortisation_figure(os.path.join(figs, "amortisation.png"), curve, {k: v for k, v in levels.items() if k in curves}, nfe1)
    convergence_figure(os.path.join(figs, "convergence.png"), curves)
    print(f"wrote {figs}/reward_vs_nfe.png, amortisation.png, convergence.png from {results}")


if __name__ == "__main__":
    main()
