"""
The equal-compute study one row at a time, each row's per-image results kept in docs/runs/ (out/ is scratch). Each row is trained as dev/reproduce.py trains it (its settings, its budget, its seeds), evaluated beside the base
on the fixed held-out list (41 prompts x 16 seeds, eval.py), and its per-image gold and fidelity written to
docs/runs/<row>.json, so that any two kept rows pair image by image without retraining either. --bon keeps the base's
best-of-N candidates (gold verifier) and the search rows in docs/runs/base_search.json; --table prints every
kept row with its paired Δ, its SE and the N of the base's best-of-N it matches (eval.amortisation).

    python dev/study_runs.py --rows=sharpen_sft_s1+sft_s1     # train (resumable) + evaluate each, ~23 min a row
    python dev/study_runs.py --bon                            # the base's 16 candidates and search rows, once
    python dev/study_runs.py --table                          # the table from docs/runs/ (seconds)

A row is a reproduce.py method (FLAGS, or sharpen_rlhf / diffusion_dpo / ddpo) with an optional _hack (trained on
reproduce.py's hack_reward, toyclip, its held-out proxy and gold tracked during the run and kept as `curve`), an
optional _x<k> budget multiple (k x the study's budget, its own run) and an optional _s1 / _s2 seed suffix, e.g.
grpo_x3_s1; sft_steps is plain sft at sharpen_sft's 480 steps, sft_te plain sft with --train_text_encoder.
--scaling_fig draws every kept method's gold (not those two controls) against its training UNet passes. A row whose
json exists is skipped. Two processes side by side (--side_by_side=2, each with its own --out) train and evaluate on a
thread each. --model trains every row from another base (reproduce.py's
FLOW settings on a flow model) and keeps them in docs/runs/<its folder name>/:

    python dev/study_runs.py --model=assets/toy-flow-model --rows=grpo+diffusion_nft --side_by_side=2 --out=out/flow
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "dev"))

import torch  # noqa: E402

import eval as E  # noqa: E402
import reproduce as R  # noqa: E402
import sample as S  # noqa: E402

# -----------------------------------------------------------------------------
rows = ""                # '+'-separated rows to train and evaluate
bon = False              # the base's best-of-N candidates and the search rows
table = False            # print the table of docs/runs/
model = ""               # the base every row trains from ("" = the built-in toy model)
runs_dir = ""            # where rows are kept ("" = docs/runs, or docs/runs/<model's folder name> for another model)
out = "out/reproduce"    # where the training runs live (dev/reproduce.py's folder: its runs are reused)
candidates = 16          # best-of-N candidates per (prompt, seed)
quick = False            # dev/reproduce.py's tiny settings (1 seed per prompt): checks the pipeline, numbers mean nothing
side_by_side = 1         # processes of this script running at once: each trains and evaluates on cores / this threads
search = "noise1x3+greedy2"
fig = ""                 # --table: also the amortisation figure here (the base's best-of-N, each method's seed mean)
scaling_fig = ""         # --table: also gold against training UNet passes here, a line per method (its 1x seed mean and
                         # each _x<k> row), the base's best-of-N as levels
pairs = ("sft-sharpen_sft+sharpen_sft-diffusion_dpo+ddpo-sharpen_rlhf+diffusion_dpo-sharpen_rlhf+sharpen_sft-grpo"
         "+grpo-ddpo+grpo-sharpen_rlhf+sharpen_rlhf-diffusion_nft+sharpen_sft-diffusion_nft+grpo_hack-grpo+grpo_x3-grpo"
         "+sft_x3-sft+grpo_x3-sharpen_sft+sft_x3-grpo_x3+sharpen_sft_x3-sharpen_sft+sharpen_sft_x3-grpo_x3"
         "+sft_x3-sharpen_sft_x3+diffusion_nft_x3-diffusion_nft+sharpen_sft_x3-diffusion_nft_x3+diffusion_nft_x3-grpo_x3"
         "+sft_x10-sft_x3+sft_x10-sft+sharpen_sft_x10-sharpen_sft_x3+sharpen_sft_x10-sharpen_sft+sharpen_sft_x10-sft_x10"
         "+sharpen_sft_x10-sft_x3+sharpen_sft_x10-grpo_x3+diffusion_nft_slow_x3-diffusion_nft_slow+diffusion_nft_slow-diffusion_nft"
         "+grpo_x10-grpo_x3+grpo_x10-grpo+grpo_x10-sharpen_sft_x10+grpo_x10-sft_x10")
                         # --table: paired differences a − b, per seed where both are kept
# -----------------------------------------------------------------------------
KEEP = ["name", "search", "overall", "delta", "delta_se", "per_skill", "diversity", "background", "palette", "denoise",
        "n", "train_nfe", "nfe_per_image", "rewards", "rewards_delta", "gold_per_image"]


def kept(path):
    return os.path.exists(path) and json.load(open(path))


def dump(obj, name):
    """docs/runs/name, whole or not at all."""
    path = os.path.join(runs_dir, name)
    with open(path + ".part", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".part", path)


def parse_row(row):
    """'sft_s1' -> ('sft', 1, 1.0); 'grpo_x3' -> ('grpo', 0, 3.0); 'sft_steps' -> ('sft_steps', 0, 1.0);
    'grpo_hack' -> ('grpo_hack', 0, 1.0): grpo trained on reproduce.py's hack_reward (toyclip) instead of gold."""
    m = re.fullmatch(r"(.+?)(_hack)?(?:_x(\d+(?:\.\d+)?))?(?:_s([12]))?", row)
    method, k, seed = m.group(1), float(m.group(3) or 1), int(m.group(4) or 0)
    if method not in (*R.FLAGS, *R.DEFAULTS, "sft_steps") or k <= 0 \
            or method == "sft_steps" and (k != 1 or m.group(2)):
        raise SystemExit(f"error: rows: unknown row {row!r} (a dev/reproduce.py method or sft_steps, optionally _hack, "
                         "then optionally _x<k> with k > 0, then optionally _s1 or _s2)")
    return method + (m.group(2) or ""), seed, k


def train_and_evaluate(row):
    method, seed, k = parse_row(row)
    steps = 480 * R.budget // 184320 if method == "sft_steps" else 0  # config/sharpen_sft.py's steps at the budget
    hack = method.endswith("_hack")  # trained on hack_reward, held-out gold and hack_reward tracked during the run
    evals = R.hack_flags(R.hack_evals) if hack else ["--eval_seeds=0"]
    method = "sft" if method == "sft_steps" else method.removesuffix("_hack")
    d = R.method_run(row, method, seed, *evals, "--ckpt_interval=10", steps=steps, nfe=int(k * R.budget))
    got = R.evaluate(f"eval_{row}", [R.BASE, os.path.join(d, "model")], THREADS)
    curve = [dict(step=st, nfe=nfe, gold=g, proxy=float(kv.get(f"heldout {R.hack_reward}", "nan")))
             for st, nfe, g, kv in R.evals(d)] if hack else []
    dump(dict(run=row, rows=[{k: r.get(k) for k in KEEP} for r in got], curve=curve), f"{row}.json")
    print(f"{row}: gold {got[1]['overall']:.3f}, Δ {got[1]['delta']:+.3f} ± {got[1]['delta_se']:.3f}", flush=True)


def base_search():
    prompts, seed_list = E.prompts_and_seeds("heldout", 16, R.eval_seeds)
    pipe = E.M.load_model(R.BASE, "cpu", torch.float32)
    judge = E.make_reward("compositional")
    rewards = torch.cat([E.best_of_n(pipe, prompts[i:i + 64], seed_list[i:i + 64], judge, candidates)[2]["rewards"]
                         for i in range(0, len(prompts), 64)])
    got = R.evaluate("eval_base_search", [R.BASE], [f"--search={search}", *THREADS])
    dump(dict(candidates=rewards.tolist(), rows=[{k: r.get(k) for k in KEEP} for r in got]), "base_search.json")


def print_table():
    """Every kept row; then by method over its kept seeds (Δ: mean ± SE over seeds, or ± the pairs' SE for one;
    the N matched by the seeds' mean gold per image); then the paired differences of `pairs`, per seed; then each
    method and budget per skill beside the base's best-of-8."""
    prompts, _ = E.prompts_and_seeds("heldout", 16, R.eval_seeds)
    bs = kept(os.path.join(runs_dir, "base_search.json"))
    cand = torch.tensor(bs["candidates"]) if bs else None
    kept_rows = {}
    for f in sorted(f for f in os.listdir(runs_dir) if f.endswith(".json")):
        d = kept(os.path.join(runs_dir, f))
        if "run" in d:
            kept_rows[d["run"]] = d["rows"]
    base = next(iter(kept_rows.values()))[0]
    g0 = torch.tensor(base["gold_per_image"])
    assert all(torch.allclose(torch.tensor(b["gold_per_image"]), g0, atol=1e-4) for b, _ in kept_rows.values()), \
        "the base rows differ: rows evaluated on other prompts or seeds"  # older files keep 4 decimals

    def matches(gold):
        m = E.amortisation(cand, gold, prompts, base_gold=g0)
        return f"{m['n']:.2f} ({m['lo']:.2f}–{m['hi']:.2f})"

    fid, fmt = ["background", "palette", "denoise"], {"background": ".3f", "palette": ".3f", "denoise": ".1f"}
    print("| row | gold | Δ vs base ± SE | background | palette | denoise × | UNet passes | matches best-of-N (95 %) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| base | {base['overall']:.3f} | | " + " | ".join(f"{base[k]:{fmt[k]}}" for k in fid) + " | | |")
    for run, (_, r) in kept_rows.items():
        print(f"| {run} | {r['overall']:.3f} | {r['delta']:+.3f} ± {r['delta_se']:.3f} | " +
              " | ".join(f"{r[k]:{fmt[k]}}" for k in fid) + f" | {r['train_nfe']} | " +
              (matches(torch.tensor(r["gold_per_image"])) if bs else "—") + " |")
    levels, series, skills = {}, {}, {}
    print("\n| method | budget | seeds | gold | Δ vs base ± SE | background | palette | denoise × | matches best-of-N (95 %) |")
    print("|---|---|---|---|---|---|---|---|---|")
    parsed = {run: parse_row(run) for run in kept_rows}  # (method, seed, budget multiple)
    for m, k in sorted(set((m, k) for m, _, k in parsed.values())):  # by method, then budget
        runs = [run for run, (m2, _, k2) in parsed.items() if (m2, k2) == (m, k)]
        rs = [kept_rows[run][1] for run in runs]
        seeds = [str(parsed[run][1] or 1337) for run in runs]  # 0: train.py's seed
        d, se = R.mean_se([r["delta"] for r in rs]) if len(rs) > 1 else (rs[0]["delta"], rs[0]["delta_se"])
        gold = torch.tensor([r["gold_per_image"] for r in rs]).mean(0)
        if k == 1:
            levels[m] = gold.mean().item()
        series.setdefault(m, []).append((sum(r["train_nfe"] for r in rs) / len(rs), gold.mean().item()))
        skills[m, k] = gold
        print(f"| {m} | {k:g}x | {', '.join(seeds)} | {gold.mean():.3f} | {d:+.3f} ± {se:.3f} | " +
              " | ".join(f"{sum(r[c] for r in rs) / len(rs):{fmt[c]}}" for c in fid) + " | " + (matches(gold) if bs else "—") + " |")
    for pair in R.names(pairs):
        a, b = pair.split("-")
        per = [(sfx, R.paired(kept_rows[a + sfx][1], kept_rows[b + sfx][1])) for sfx in ("", "_s1", "_s2")
               if a + sfx in kept_rows and b + sfx in kept_rows]
        if per:
            mean, se = R.mean_se([d for _, (d, _) in per]) if len(per) > 1 else per[0][1]
            print(f"\n{a} − {b}: " + ", ".join(f"{d:+.3f} ± {s:.3f} ({sfx[1:] or 'seed 1337'})" for sfx, (d, s) in per) +
                  f"; mean {mean:+.3f} ± {se:.3f}")
    if bs:
        curve = E.expected_best(cand).mean(0).tolist()
        print(f"\nbase best-of-N, N = 1..{len(curve)}: " + ", ".join(f"{v:.3f}" for v in curve))
        for r in bs["rows"][1:]:
            print(f"{r['name']} {r['search']}: gold {r['overall']:.3f}, NFE/image {r['nfe_per_image']}, "
                  f"Δ {r['delta']:+.3f} ± {r['delta_se']:.3f}")
        tags = [E.toyworld.parse(p).skill for p in prompts]
        n8 = min(8, cand.shape[1])
        print(f"\nper skill, where each row stands against the base's best-of-{n8} (gold verifier):")
        print("| row | " + " | ".join(dict.fromkeys(tags)) + " |\n|---|" + "---|" * len(set(tags)))
        by_budget = {f"{m} {k:g}x": g for (m, k), g in sorted(skills.items())}
        for name, g in {"base": g0, f"base, best-of-{n8}": E.expected_best(cand)[:, n8 - 1], **by_budget}.items():
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in E.by_tag(g.double(), tags).values()) + " |")
        import figures as FIG
        if fig:
            nfe1 = base.get("nfe_per_image") or E.num_steps  # older files do not keep it: eval.py's steps
            FIG.amortisation_figure(fig, curve, levels, nfe1)
        if scaling_fig:
            FIG.scaling_figure(scaling_fig, {m: p for m, p in series.items() if m not in ("sft_steps", "sft_te")  # controls
                                              and not m.endswith("_hack")},
                               sorted({k for _, _, k in parsed.values()}), R.budget, curve)


def main():
    global THREADS, runs_dir
    S.configure(globals(), sys.argv[1:])
    for pair in R.names(pairs):
        if pair.count("-") != 1:
            sys.exit(f"error: pairs: {pair!r} is not 'a-b' (rows a and b; pairs are joined by '+')")
    R.out, R.jobs = os.path.abspath(out), side_by_side  # jobs > 1: train.py's --threads
    R.model, R.BASE = model, os.path.abspath(model) if model else R.M.TOY_MODEL  # model: each run gets --model
    if model:
        R.M.check_model_folder(R.BASE)
    runs_dir = runs_dir or os.path.join(ROOT, "docs", "runs", os.path.basename(R.BASE) if model else "")
    os.makedirs(runs_dir, exist_ok=True)
    if quick:  # reproduce.py --quick's budget and seeds
        R.quick, R.budget, R.eval_seeds = True, 200, 1
    THREADS = [f"--threads={max(1, (os.cpu_count() or 1) // side_by_side)}"] if side_by_side > 1 else []
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // side_by_side))
    os.makedirs(R.out, exist_ok=True)
    for row in R.names(rows):  # every row checked before any trains
        parse_row(row)
    for row in R.names(rows):
        if not kept(os.path.join(runs_dir, f"{row}.json")):
            train_and_evaluate(row)
    if bon and not kept(os.path.join(runs_dir, "base_search.json")):
        base_search()
    if table:
        print_table()


if __name__ == "__main__":
    main()
