"""
Can the built-in model's denoiser learn where to put a pair at all? Plain denoising (sft's loss: uniform t, exact
renders, the UNet alone, AdamW) on a few spatial compositions, each in all four relations, and nothing else; every
`every` steps the relation probe (relation_probe.py) on those very captions: where both objects are drawn, how often
the pair stands in the asked relation and in the opposite one. The probe draws each caption's four relations from the
same seeds, so a model that ignores the word draws the same images for them and asked equals opposite exactly. Asked
rising above opposite: the denoiser can learn relations, and the study's models place pairs at chance for want of
signal; the two level however long it trains: its conditioning path cannot carry the relation.

    python dev/relation_capacity.py                      # 1,500 steps of 32 renders: ~40 min on 2 CPU cores
    python dev/relation_capacity.py --pairs=1 --steps=300 --every=100 --seeds=4    # a quick look
"""
import os
import random
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models as M
import sample as S
import toyworld
from relation_probe import encoder_ratio, probe_prompts

model = M.TOY_MODEL
pairs = 4                # object pairs (the first train-split spatial compositions with distinct pairs), x 4 relations
steps = 1500
batch = 32               # renders a step, captions drawn uniformly
lr = 1e-4                # sft's
every = 250              # steps between probes (and at 0)
seeds = 16               # probe seeds per caption
train_text_encoder = False  # train the text encoder too (fp32, the same lr): a conditioning free to separate the words
threads = 0              # torch threads (0: all cores)
seed = 1337
S.configure(globals(), sys.argv[1:])  # --key=value overrides the lines above
if pairs < 1 or steps < 0 or batch < 1 or every < 1 or seeds < 1:
    sys.exit("error: pairs, batch, every and seeds must be >= 1 and steps >= 0")
if threads:
    torch.set_num_threads(threads)

# the captions: each object pair of the first train spatial specs in all four relations
items = list(dict.fromkeys(s.items for s in toyworld._SPECS["train"] if s.skill == "spatial"))[:pairs]
captions = [toyworld.caption(toyworld.Spec("spatial", it, rel)) for it in items for rel in toyworld.RELATIONS]
pipe = M.load_model(model)
unet, te = pipe.unet.requires_grad_(True), pipe.text_encoder.requires_grad_(train_text_encoder)
trained = [*unet.parameters(), *(te.parameters() if train_text_encoder else [])]
opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
probe_seeds = [[10_000 + k for k in range(seeds)] for _ in captions]
flat = lambda xs: [x for x in xs for _ in range(seeds)]  # noqa: E731
print(f"{len(captions)} captions: {captions}")
print("| step | loss | horizontal: both drawn | asked | opposite | vertical: both drawn | asked | opposite | "
      "encoder: opposite / colour swap, horizontal | vertical | encoder weights moved |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
te0 = [p.detach().clone() for p in te.parameters()]
rng, gen, losses, t0 = random.Random(seed), torch.Generator().manual_seed(seed), [], time.time()
for step in range(steps + 1):
    if step % every == 0 or step == steps:
        unet.eval(), te.eval()
        with torch.no_grad():
            n = probe_prompts(pipe, flat(captions), [s for ss in probe_seeds for s in ss])
            ratio = encoder_ratio(pipe)  # over the held-out spatial prompts, as relation_probe.py reports it
            moved = (sum((p - q).pow(2).sum() for p, q in zip(te.parameters(), te0)) /
                     sum(q.pow(2).sum() for q in te0)).sqrt().item()
        unet.train(), te.train(train_text_encoder)
        cols = " | ".join(f"{c['both']}/{c['images']} | {c['asked'] / max(c['both'], 1):.3f} | "
                          f"{c['opposite'] / max(c['both'], 1):.3f}" for c in n.values())
        loss = f"{np.mean(losses):.5f}" if losses else ""
        print(f"| {step} | {loss} | {cols} | {ratio['horizontal']:.3f} | {ratio['vertical']:.3f} | {moved:.4f} |  "
              f"({time.time() - t0:.0f} s)", flush=True)
        losses = []
    if step == steps:
        break
    caps = [rng.choice(captions) for _ in range(batch)]
    images = [toyworld.render(toyworld.parse(c), np.random.default_rng(rng.randrange(2**32)))[0] for c in caps]
    x0 = M.from_images(pipe, torch.stack([torch.from_numpy(i) for i in images]))
    t = S.train_timesteps(pipe, batch, gen)
    x_t = S.add_noise(pipe, x0, t, torch.randn(x0.shape, generator=gen))
    with torch.enable_grad() if train_text_encoder else torch.no_grad():
        cond = te(M.tokenize(pipe, caps))[0] if train_text_encoder else M.encode(pipe, caps)
    out = M.unet_call(pipe, unet, x_t, t, cond).float()
    loss = (out - S.training_target(pipe, x_t, x0, t)[0].float()).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    losses.append(loss.item())
