"""
How much of search does the path-integral selection carry? For train prompts, as train.py rolls them (the
prompt, the start step drawn per prompt, the n noises that reach x_t, the m scored DDIM steps), each of the n
trajectories is also sampled on to the end, and its final image is scored with the gold judge. Selection
(argmax of the path reward R, Eq. 8; ties broken uniformly) is then compared with the oracle that picks by the
final gold G: best-of-n among the same trajectories, the search that sharpening tries to amortise.

    python dev/selection.py                       # the built-in model, sharpen_rlhf's and sharpen_sft's settings
    python dev/selection.py --n_traj=8 --prompts=128

Per algorithm (rlhf: the model's own sample is noised, m = 3, from train.py's start range; sft: the dataset render,
m = 1, from anywhere in the schedule, as config/sharpen_sft.py), over prompts (mean ± SE): `no preference`: prompts
whose n path rewards all tie;
`agree`: P(the selected trajectory has the best final G) against chance (a uniform pick); `selected − mean G`:
the final gold the selection gains over a uniform pick; `oracle − mean G`: best-of-n's gain among the same
trajectories; `captured`: their ratio; `best-of-n of independent samples`: its gain among n samples from fresh
noise (eval.py's best-of-n, the search the comparison is about); `G_w − G_l`: the final gold gap between RLHF's winner and loser (oracle: max − min); `loss_sel −
loss_mean`: the denoising loss of the base model at the selected trajectories' states minus the mean over all n
(< 0: the selection picks states the model already denoises well).

What `oracle − mean G` bounds: for rlhf, the final gold that a pick among these trajectories can gain, the room
its preference pairs have. For sft it bounds nothing that is learned: sharpen_sft's target is the render whichever
trajectory is selected, so the selection only decides which noise draws (states) the loss sees; G scores the
trajectories' own outcomes, which sft never trains toward.
"""
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402

import rollout  # noqa: E402
import models as M  # noqa: E402
import sample as S  # noqa: E402
import sharpen  # noqa: E402
from reward import compositional  # noqa: E402

# -----------------------------------------------------------------------------
model = M.TOY_MODEL      # the model folder
prompts = 256            # train prompts (train.py's prompts 0..prompts-1 of seed `seed`)
n_traj = 3               # trajectories per prompt (train.py's default)
m_rlhf = 3               # rolled, scored steps for rlhf (train.py's default) and sft (config/sharpen_sft.py)
m_sft = 1
start_range = "0.05:0.45"  # rlhf's start steps (train.py's default: 1..9 of 20)
start_range_sft = ""     # sft's (config/sharpen_sft.py: the whole schedule)
num_steps = 20
agg = "sum"
seed = 1337
batch = 32               # prompts per batch
threads = 0              # torch threads (0 = every core; 1 beside another job: 2 threads on 2 busy cores crawl)
# -----------------------------------------------------------------------------


def gold(pipe, x, prompts_):
    return compositional(M.to_images(pipe, x), prompts_)[0].double()


@torch.no_grad()
def measure(pipe, algo, m, start):
    """Per prompt: R (n,), G (n,), loss (n,) for `algo` (rlhf | sft), F (n,): the final gold of n samples from
    independent noise (eval.py's best-of-n), and K: the start step. The set-up is train.py's (rollout.py)."""
    cfg = SimpleNamespace(seed=seed, n_traj=n_traj, m_steps=m, start_range=start, num_steps=num_steps,
                          guidance=1.0, eta=0.0, profile=False)
    run = rollout.Run(cfg, pipe)
    ts, u, n = run.ts, run.uncond, n_traj
    R, G, L, F, K = [], [], [], [], []
    for b0 in range(0, prompts, batch):
        gidx = list(range(b0, min(prompts, b0 + batch)))
        ps = [run.train_prompt(g) for g in gidx]
        cond = M.encode(pipe, ps)
        x0 = rollout.renders(run, ps, gidx) if algo == "sft" else rollout.own_samples(run, cond, gidx)
        gens = [torch.Generator().manual_seed(run.seed_for("noise", g, 32 + j)) for g in gidx for j in range(n)]
        fresh = S.rollout(pipe, S.randn(pipe.latent_shape, gens), ts, cond.repeat_interleave(n, 0), u, 1.0, 0.0, gens,
                          record=False)
        F += list(gold(pipe, fresh, [p for p in ps for _ in range(n)]).view(len(gidx), n))
        x_t, ks, *_ = rollout.noised(run, x0, gidx, n)  # train.py's start steps and noises
        Rb, Gb, Lb = (torch.zeros(len(gidx), n, dtype=torch.float64) for _ in range(3))
        for k in sorted(set(ks)):  # prompts that start at step k: their n trajectories rolled on to the end
            rows = [i for i, kk in enumerate(ks) if kk == k]
            rows_n = [i * n + j for i in rows for j in range(n)]
            x0n, condn = x0[rows].repeat_interleave(n, 0), cond[rows].repeat_interleave(n, 0)
            traj = S.rollout(pipe, x_t[rows_n], ts[k:], condn, u, 1.0, 0.0)
            pn = [ps[i] for i in rows for _ in range(n)]
            per_step = torch.stack([gold(pipe, traj.x0_pred[:, j], pn) for j in range(m)], 1)
            Rb[rows] = sharpen.trajectory_rewards(per_step.view(len(rows), n, m), agg)
            Gb[rows] = gold(pipe, traj.x_final, pn).view(len(rows), n)
            tgt, _ = S.training_target(pipe, traj.x[:, :m].flatten(0, 1), x0n.repeat_interleave(m, 0),
                                       traj.t[:m].repeat(len(x0n)))
            mse = (traj.model_out[:, :m].flatten(0, 1) - tgt).pow(2).flatten(1).mean(1).double()
            Lb[rows] = mse.view(len(rows), n, m).mean(2)
        R, G, L, K = R + [Rb], G + [Gb], L + [Lb], K + ks
    return torch.cat(R), torch.cat(G), torch.cat(L), torch.stack(F), torch.tensor(K)


def summary(R, G, L, F):
    """The table's cells: mean ± SE over prompts of each statistic (see the docstring)."""
    best_r = (R == R.max(1, keepdim=True).values).double()  # the selection's tie set
    worst_r = (R == R.min(1, keepdim=True).values).double()
    best_g = (G == G.max(1, keepdim=True).values).double()
    pick = lambda w, v: (w * v).sum(1) / w.sum(1)  # noqa: E731  expected value under a uniform pick within w
    tie = (R.max(1).values == R.min(1).values).double()
    pref = tie == 0
    stats = {"no preference": tie,
             "agree": pick(best_r, best_g), "agree by chance": best_g.mean(1),
             "selected − mean G": pick(best_r, G) - G.mean(1), "oracle − mean G": G.max(1).values - G.mean(1),
             "best-of-n of independent samples − mean": F.max(1).values - F.mean(1),
             "G_w − G_l (preference pairs)": (pick(best_r, G) - pick(worst_r, G))[pref],
             "oracle max − min": (G.max(1).values - G.min(1).values)[pref],
             "loss_sel − loss_mean": pick(best_r, L) - L.mean(1)}
    nan = float("nan")
    cells = {k: (v.mean().item() if len(v) else nan, v.std().item() / len(v) ** 0.5 if len(v) > 1 else nan)
             for k, v in stats.items()}
    cells["captured"] = (cells["selected − mean G"][0] / max(cells["oracle − mean G"][0], 1e-9), float("nan"))
    return cells


def main():
    S.configure(globals(), sys.argv[1:])
    checks = [(prompts < 1, f"prompts must be >= 1, got {prompts}"), (batch < 1, f"batch must be >= 1, got {batch}"),
              (threads < 0, f"threads must be >= 0, got {threads}"),
              (n_traj < 2, f"n_traj must be >= 2, got {n_traj}"),
              (agg not in sharpen.AGGREGATES, f"agg must be one of {sharpen.AGGREGATES}, got {agg!r}"),
              (not 1 <= min(m_rlhf, m_sft) <= max(m_rlhf, m_sft) <= num_steps,
               f"m_rlhf={m_rlhf} and m_sft={m_sft} must be in 1..num_steps={num_steps}"),
              (rollout.parse_range(start_range) is None, f"start_range={start_range!r}: expected 'a:b', 0 <= a <= b <= 1"),
              (rollout.parse_range(start_range_sft) is None,
               f"start_range_sft={start_range_sft!r}: expected 'a:b', 0 <= a <= b <= 1 or '' (anywhere)")]
    for bad, msg in checks:
        if bad:
            raise SystemExit(f"error: {msg}")
    M.check_model_folder(model)
    torch.set_num_threads(threads or os.cpu_count())
    pipe = M.load_model(model)
    cols, by_k = {}, []
    for algo, m, start in (("rlhf", m_rlhf, start_range), ("sft", m_sft, start_range_sft)):
        R, G, L, F, K = measure(pipe, algo, m, start)
        cols[f"{algo} (n={n_traj}, m={m})"] = summary(R, G, L, F)
        for k in sorted(set(K.tolist())):  # where the trajectories start: how much they still differ
            c, i = summary(R[K == k], G[K == k], L[K == k], F[K == k]), K == k
            by_k.append(f"| {algo} | {k} | {int(i.sum())} | {c['no preference'][0]:.2f} | {c['selected − mean G'][0]:+.3f} | "
                        f"{c['oracle − mean G'][0]:+.3f} ± {c['oracle − mean G'][1]:.3f} | "
                        f"{c['best-of-n of independent samples − mean'][0]:+.3f} |")
    cell = lambda v: f"{v[0]:.3f}" + ("" if v[1] != v[1] else f" ± {v[1]:.3f}")  # noqa: E731
    print(f"{prompts} train prompts of seed {seed}, {num_steps} {'Euler' if S.is_flow(pipe) else 'DDIM'} steps, start_range "
          f"{start_range!r} (rlhf) and {start_range_sft!r} (sft), agg {agg}\n")
    print("| statistic | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for k in next(iter(cols.values())):
        print(f"| {k} | " + " | ".join(cell(c[k]) for c in cols.values()) + " |")
    print(f"\nBy start step k (of {num_steps}):\n")
    print("| algorithm | k | prompts | no preference | selected − mean G | oracle − mean G | independent best-of-n "
          "− mean |\n|---|---|---|---|---|---|---|")
    print("\n".join(by_k))


if __name__ == "__main__":
    main()
