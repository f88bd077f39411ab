"""
Figures (matplotlib, files only): one colour per method in every figure; line plots on log-2 axes with best-of-N
levels, image grids with prompts as row labels, and the two figures eval.py writes (reward vs NFE, amortisation).
"""
import math
import os
import textwrap

import torch


COLOURS = {  # method -> colour; a name is coloured by the longest method it contains
    "toy-model": "#7f7f7f", "pretrain": "#bcbd22", "sharpen_rlhf": "#1f77b4", "sharpen_sft": "#d62728",
    "sft": "#2ca02c", "diffusion_dpo": "#ff7f0e", "ddpo": "#9467bd", "bon": "#17becf", "noise": "#8c564b",
    "greedy": "#e377c2", "continued": "#aec7e8", "raft": "#8c6d31", "sft_steps": "#98df8a", "diffusion_nft": "#e7ba52",
    "diffusion_nft_slow": "#bd9e39", "grpo": "#393b79"}
NAMES = {"bon": "best-of-N", "noise": "noise search", "greedy": "greedy search"}


def colour(name):
    """The fixed colour of the method in `name` (e.g. hack_ddpo -> ddpo's); black if none."""
    keys = [k for k in COLOURS if k in name]
    return COLOURS[max(keys, key=len)] if keys else "black"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def line_plot(path, series, xlabel, ylabel, xticks=None, levels=None, top_axis=None, inline_levels=False):
    """series {name: [(x, y), ...]} as lines with markers (one point: a marker) on a log2 x axis with ticks
    at xticks (or a linear axis if xticks is None); levels {name: y} as horizontal dashed lines (inline_levels: grey,
    each named on the line instead of in the legend); top_axis (label, scale, ticks): a second x axis on top reading
    x / scale. The legend sits right of the axes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, "o-", color=colour(name), label=NAMES.get(name, name), markersize=5)
    for name, y in (levels or {}).items():
        if inline_levels:
            ax.axhline(y, color="grey", linestyle="--", linewidth=1.0)
            ax.annotate(NAMES.get(name, name), (0.01, y), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                        color="grey")
        else:
            ax.axhline(y, color=colour(name), linestyle="--", linewidth=1.2, label=NAMES.get(name, name))
    if xticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xticks, [f"{v:,.0f}" if v == int(v) else f"{v:g}" for v in xticks])  # 1,843,200, not 1.8432e+06
        ax.minorticks_off()
        xs = [x for pts in series.values() for x, _ in pts] + list(xticks)
        ax.set_xlim(min(xs) / 1.15, max(xs) * 1.15)
    if top_axis:
        label, scale, ticks = top_axis
        top = ax.secondary_xaxis("top", functions=(lambda x: x / scale, lambda n: n * scale))
        top.set_xticks(ticks, [f"{v:g}" for v in ticks])
        top.minorticks_off()
        top.set_xlabel(label)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def nfe_ticks(nfes):
    """Ticks for an NFE axis: the smallest NFE times powers of two, up to the largest (20, 40, 80, 160)."""
    lo, hi = min(nfes), max(nfes)
    return [lo * 2 ** k for k in range(int(math.log2(hi / lo) + 1e-9) + 1)] or [lo]


def wrap(text, width):
    """Each line of text wrapped at width (words kept whole), joined by newlines."""
    return "\n".join(w for line in text.split("\n") for w in textwrap.wrap(line, width, break_long_words=False))


def comparison_grid(path, columns, names, prompts, tile=1.0):
    """columns: one (k,3,H,W) image tensor in [0,1] per method, row i the same prompt in each; names: the
    column headers (method and NFE); prompts: the k row labels. Tiles of `tile` inches at 96 dpi."""
    plt = pyplot()
    k, (_, H, W), gap = len(prompts), columns[0].shape[1:], 2
    canvas = torch.ones(3, k * (H + gap) - gap, len(columns) * (W + gap) - gap)  # white between the tiles
    for j, col in enumerate(columns):
        for i in range(k):
            canvas[:, i * (H + gap):i * (H + gap) + H, j * (W + gap):j * (W + gap) + W] = col[i].float().clamp(0, 1)
    fig, ax = plt.subplots(figsize=(len(columns) * tile + 2.6, k * tile + 0.9))
    ax.imshow(canvas.permute(1, 2, 0).cpu().numpy(), interpolation="nearest" if W <= 96 * tile else "antialiased")
    ax.xaxis.tick_top()
    ax.set_xticks([j * (W + gap) + W / 2 for j in range(len(columns))], [wrap(n, 13) for n in names], fontsize=8)
    ax.set_yticks([i * (H + gap) + H / 2 for i in range(k)], [wrap(p, 30) for p in prompts], fontsize=8)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=96, bbox_inches="tight")
    plt.close(fig)


def reward_vs_nfe_figure(path, rows):
    """Held-out gold against NFE per image: search rows as one curve per method, models as points."""
    series = {}
    for r in rows:
        name = r["search"].rstrip("0123456789x") if r["search"] else r["name"]
        series.setdefault(name, []).append((r["nfe_per_image"], r["overall"]))
    line_plot(path, series, "NFE per image (UNet passes, log scale)", "held-out gold reward",
              xticks=nfe_ticks([r["nfe_per_image"] for r in rows]))


def amortisation_figure(path, curve, levels, nfe1, ylabel="held-out gold reward"):
    """The base model's best-of-N curve (curve[N-1], gold verifier) against NFE per image, each trained model
    as a level line (levels {name: gold}); where a line crosses the curve is the N that model amortises."""
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= len(curve)]
    line_plot(path, {"bon": [(n * nfe1, curve[n - 1]) for n in range(1, len(curve) + 1)]},
              "NFE per image (UNet passes, log scale)", ylabel, xticks=[n * nfe1 for n in ns],
              levels=levels, top_axis=("N (best-of-N of the base model, gold verifier)", nfe1, ns))


def scaling_figure(path, series, multiples, budget, curve):
    """Held-out gold against training UNet passes, a line per method (series {name: [(passes, gold), ...]}), ticks at
    `multiples` of `budget` (read on the top axis), the base model's best-of-N (curve[N-1], gold verifier) as named
    grey levels."""
    line_plot(path, series, "training UNet passes (forward passes, grad counted 3x)", "held-out gold reward",
              xticks=[k * budget for k in multiples],
              levels={f"base, best-of-{n}": curve[n - 1] for n in (1, 2, 4, 8, 16, 32) if n <= len(curve)},
              top_axis=(f"x the study's budget ({budget:,} passes)", budget, multiples), inline_levels=True)
