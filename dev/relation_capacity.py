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
    python dev/relation_capacity.py --attention=16+8   # cross-attention at 16x16 too (new layers start as identities)
    python dev/relation_capacity.py --init=scratch --lr=1e-3 --pairs=1   # a fresh UNet on 4 captions only
    python dev/relation_capacity.py --init=scratch --lr=1e-3 --pairs=1 --encoder=bidirectional   # objects see the word

--attention names the feature-map sides that get cross-attention (the built-in UNet: 8 only, its last down block,
the mid block and its first up block). Each added level turns that resolution's down and up block into its
CrossAttn form: the same ResNets and resamplers with the base's weights, plus a transformer block whose output
projection starts at zero, so the model starts as the base model exactly (checked: the same first probe line);
the added layers train at --new_lr (at the base's lr they stay near zero: 500 steps probed as the base's run did).
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
attention = "8"          # feature-map sides with cross-attention, "+"-separated, of 32, 16, 8 (8: the base's own)
new_lr = 1e-3            # the added cross-attention layers' learning rate (1e-3: the base's pretraining lr)
init = "base"            # base: the model's UNet | scratch: a fresh random-init toy UNet (the same layout), the model's
                         # text encoder kept: can this architecture learn relations from the denoising loss at all?
encoder = "causal"       # causal: the text encoder as trained (a token sees those before it: the first object's tokens
                         # never see the relation word) | bidirectional: its causal mask removed, every token sees all
threads = 0              # torch threads (0: all cores)
seed = 1337
S.configure(globals(), sys.argv[1:])  # --key=value overrides the lines above
if pairs < 1 or steps < 0 or batch < 1 or every < 1 or seeds < 1:
    sys.exit("error: pairs, batch, every and seeds must be >= 1 and steps >= 0")
sides = [int(s) for s in attention.split("+") if s.strip().isdigit()]
if not sides or len(set(sides)) != len(sides) or len(sides) != len(attention.split("+")):
    sys.exit(f"error: attention={attention!r}: expected distinct feature-map sides like '16+8'")
if init not in ("base", "scratch"):
    sys.exit(f"error: init must be 'base' or 'scratch', got {init!r}")
if encoder not in ("causal", "bidirectional"):
    sys.exit(f"error: encoder must be 'causal' or 'bidirectional', got {encoder!r}")
if threads:
    torch.set_num_threads(threads)
if encoder == "bidirectional":  # CLIP's text model asks masking_utils for its causal mask: an all-zero additive one
    import transformers.models.clip.modeling_clip as clip_module
    clip_module.create_causal_mask = lambda config, inputs_embeds, **kw: inputs_embeds.new_zeros(
        inputs_embeds.shape[0], 1, inputs_embeds.shape[1], inputs_embeds.shape[1])

# the captions: each object pair of the first train spatial specs in all four relations
items = list(dict.fromkeys(s.items for s in toyworld._SPECS["train"] if s.skill == "spatial"))[:pairs]
captions = [toyworld.caption(toyworld.Spec("spatial", it, rel)) for it in items for rel in toyworld.RELATIONS]
pipe = M.load_model(model)


def with_attention(unet, sides):
    """The UNet with cross-attention at these feature-map sides (a superset of its own): its config's down/up block
    types at the added levels in their CrossAttn form, the base's weights loaded (every base key), each added
    transformer's proj_out zeroed, so that it starts as the base model."""
    from diffusers import UNet2DConditionModel
    cfg = dict(unet.config)
    level_side = [cfg["sample_size"] // 2 ** i for i in range(len(cfg["down_block_types"]))]  # down block i; up n-1-i
    own = [side for side, t in zip(level_side, cfg["down_block_types"]) if t.startswith("CrossAttn")]
    if set(sides) - set(level_side) or set(own) - set(sides):
        sys.exit(f"error: attention={'+'.join(map(str, sides))!r}: sides must be among {level_side} and include the "
                 f"base's {own}")
    if sorted(sides) == sorted(own):
        return unet
    attn = [side in sides for side in level_side]
    cfg["down_block_types"] = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    cfg["up_block_types"] = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    new = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(".attentions." in k for k in missing), (missing, unexpected)
    added = {k.rsplit(".proj_out.", 1)[0] for k in missing if ".proj_out." in k}
    with torch.no_grad():
        for name, module in new.named_modules():
            if name in added:
                module.proj_out.weight.zero_(), module.proj_out.bias.zero_()
    return new


if init == "scratch":
    pipe.unet = toyworld.new_toy_model(seed).unet
base_names = set(pipe.unet.state_dict())
pipe.unet = with_attention(pipe.unet, sides)
added_names = {name for name, _ in pipe.unet.named_parameters()} - base_names
print(f"cross-attention at sides {sides}: {sum(p.numel() for p in pipe.unet.parameters()):,} UNet parameters, "
      f"{len(added_names)} added tensors at lr {new_lr:g}")
unet, te = pipe.unet.requires_grad_(True), pipe.text_encoder.requires_grad_(train_text_encoder)
trained = [*unet.parameters(), *(te.parameters() if train_text_encoder else [])]
added = {id(p) for name, p in unet.named_parameters() if name in added_names}  # with_attention's new layers
opt = torch.optim.AdamW([dict(params=[p for p in trained if id(p) not in added]),
                         dict(params=[p for p in trained if id(p) in added], lr=new_lr)], lr=lr, weight_decay=0.0)
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
