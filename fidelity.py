"""
Fidelity: what a model makes beside its score. The gold judge reads shapes, colours and positions and nothing
else, so a model trained on its own samples can drift where it does not look (a grey or tinted background,
muddy colours, grain) while its reward holds. For toy-world images (B, 3, H, W) in [0, 1]:

    background   mean |1 - value| over the background pixels (those whose nearest palette colour is white, as
                 the detector decides) and their channels; 0 for renders
    palette      mean distance (RGB, Euclidean) of a pixel to its nearest palette colour; 0 for renders
    denoise      a model's denoising loss (its training loss, at fixed t and noises) on the images over its loss on
                 renders of the same prompts: 1 for renders, > 1 where the images lie off the data it learned

eval.py reports the three beside gold for every row, `denoise` with its first model (the base) as the judge.
"""
import numpy as np
import torch

import models as M
import sample as S
import toyworld

DENOISE_T = (20, 400)  # the noise levels of the denoise ratio (of 1000 training steps): fine detail, then layout


def palette_stats(images):
    """-> (background, palette) of images (B, 3, H, W) in [0, 1], as the module docstring defines them."""
    x = images.float().permute(0, 2, 3, 1).reshape(-1, 3)  # (B*H*W, 3)
    dist = torch.cdist(x, toyworld.PALETTE)  # (pixels, 7), index 0 the white background
    near, cls = dist.min(1)
    bg = cls == 0
    background = (1 - x[bg]).abs().mean().item() if bg.any() else float("nan")
    return background, near.mean().item()


def renders(prompts, seeds):
    """The toy world's render of each prompt (the layout drawn from its seed): (B, 3, H, W) in [0, 1]."""
    return torch.stack([torch.from_numpy(toyworld.render(toyworld.parse(p), np.random.default_rng(s))[0])
                        for p, s in zip(prompts, seeds)])


@torch.no_grad()
def denoise_loss(pipe, images, prompts, ts=DENOISE_T, batch_size=64):
    """pipe's denoising loss on images (B, 3, H, W) in [0, 1] with their prompts: {t: mean squared error of the
    model output against its training target}, image i noised at every t with the noise of seed i."""
    x0 = M.from_images(pipe, images.to(pipe.device))
    eps = S.randn(x0.shape[1:], [torch.Generator().manual_seed(i) for i in range(len(x0))], pipe.device)
    out = {}
    for t in ts:
        total = 0.0
        for i in range(0, len(x0), batch_size):
            x, e = x0[i:i + batch_size], eps[i:i + batch_size]
            tt = torch.full((len(x),), t, device=pipe.device)
            tt = tt.float() if S.is_flow(pipe) else tt.long()
            x_t = S.add_noise(pipe, x, tt, e)
            pred = M.unet_call(pipe, pipe.unet, x_t, tt, M.encode(pipe, prompts[i:i + batch_size]))
            total += ((pred.float() - S.param_target(pipe, e, x, tt).float()) ** 2).mean((1, 2, 3)).sum().item()
        out[t] = total / len(x0)
    return out


def fidelity(images, prompts, seeds, judge=None, reference=None):
    """{background, palette[, denoise]} of images; with judge (a pipe): denoise, the judge's loss on the images over
    its loss on `reference` ({t: loss} of denoise_loss on the renders; computed here if not given), mean over t."""
    background, palette = palette_stats(images)
    res = dict(background=background, palette=palette)
    if judge is not None:
        ref = reference or denoise_loss(judge, renders(prompts, seeds), prompts)
        own = denoise_loss(judge, images, prompts, tuple(ref))
        res["denoise"] = sum(own[t] / ref[t] for t in ref) / len(ref)
        res["denoise_per_t"] = {t: (own[t], ref[t]) for t in ref}
    return res
