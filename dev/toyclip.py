"""
toyclip: the toy world's learned reward. A tiny CLIP (a transformers.CLIPModel: ViT on 32x32 pixels,
the toy model's word-level tokenizer) trained contrastively (Radford et al. 2021, arXiv 2103.00020)
on toy-world scenes and their train-split captions (web-like alt-text, as the base model's pretraining, or
exact), with one-field-corrupted exact captions as hard negatives. reward.py scores with it through the
same loader a real CLIP folder goes through, so the toy world has a learned reward to optimise and the exact
`compositional` judge to check it against: that is how reward hacking becomes measurable.

    python dev/toyclip.py                                   # writes assets/toyclip (minutes on 2 CPU cores)
    python dev/toyclip.py --steps=200 --out=/tmp/toyclip    # a quick one

The folder is laid out like openai/clip-vit-large-patch14: config.json, model.safetensors, tokenizer
files, preprocessor_config.json.
"""
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python dev/toyclip.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import reward  # noqa: E402
import sample as S  # noqa: E402
import toyworld  # noqa: E402

# -----------------------------------------------------------------------------
out = "assets/toyclip"   # the CLIP folder written at the end (atomically)
steps = 3000             # optimizer steps
batch_size = 128         # scenes per step; each brings its caption and one corrupted caption
captions = "alttext"     # the positives: alttext (web-like, toyworld.ALT_TEXT, as the base model's) | exact
lr = 1e-3                # AdamW peak learning rate, cosine to lr/10 after 100 warmup steps
seed = 0
eval_pairs = 2000        # held-out scenes scored against a corrupted caption at the end
threads = 0              # torch threads (0 = all cores)
# -----------------------------------------------------------------------------


def new_toyclip(seed=0):
    """A random-init tiny CLIP folder's contents: (model, tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(seed)
    tokenizer = toyworld.new_toy_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(image_size=toyworld.SIZE, patch_size=4, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=64)
    processor = CLIPImageProcessor(size={"shortest_edge": toyworld.SIZE}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, crop_size={"height": toyworld.SIZE, "width": toyworld.SIZE})
    return CLIPModel(config), tokenizer, processor


def batch(rng, np_rng, B, kind="exact"):
    """B train-split scenes -> (images (B,3,32,32), their captions (exact or alt-text), corrupted exact captions)."""
    specs = [toyworld.random_spec(rng) for _ in range(B)]
    images = torch.stack([torch.from_numpy(toyworld.render(s, np_rng)[0]) for s in specs])
    caps = [toyworld.alt_text(s, rng)[0] if kind == "alttext" else toyworld.caption(s) for s in specs]
    return images, caps, [toyworld.caption(toyworld.corrupt(s, rng)) for s in specs]


def contrastive_loss(img_emb, txt_emb, captions, texts, logit_scale):
    """InfoNCE both ways (arXiv 2103.00020). Texts = the B captions then B hard negatives; every text
    equal to an image's caption is a positive of it (single-object captions repeat within a batch)."""
    logits = logit_scale * img_emb @ txt_emb.T  # (B, 2B)
    pos = torch.tensor([[t == c for t in texts] for c in captions], dtype=torch.float)  # (B, 2B)
    i2t = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    B = len(captions)
    pos_t = pos[:, :B].T  # captions -> the images they describe
    t2i = -(pos_t / pos_t.sum(1, keepdim=True) * logits[:, :B].T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def heldout_accuracy(score_fn, n=2000, seed=1):
    """Fraction of held-out scenes whose caption scores above a one-field-corrupted caption."""
    rng, np_rng, wins = random.Random(seed), np.random.default_rng(seed), 0
    for lo in range(0, n, 250):
        specs = [toyworld.random_spec(rng, "heldout") for _ in range(min(250, n - lo))]
        images = torch.stack([torch.from_numpy(toyworld.render(s, np_rng)[0]) for s in specs])
        good, _ = score_fn(images, [toyworld.caption(s) for s in specs])
        bad, _ = score_fn(images, [toyworld.caption(toyworld.corrupt(s, rng)) for s in specs])
        wins += (good > bad).sum().item()
    return wins / n


def main():
    S.configure(globals(), sys.argv[1:])
    if captions not in ("alttext", "exact"):
        raise SystemExit(f"error: --captions must be 'alttext' or 'exact', got {captions!r}")
    torch.set_num_threads(threads or os.cpu_count())
    model, tokenizer, processor = new_toyclip(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    bar, t0 = tqdm(range(steps), desc="toyclip", mininterval=5, disable=not sys.stderr.isatty()), time.time()
    for it in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1, (it + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * it / steps)))
        images, caps, negatives = batch(rng, np_rng, batch_size, captions)
        texts = caps + negatives
        ids = tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt").input_ids
        img = F.normalize(reward.clip_features(model.get_image_features(pixel_values=(images - 0.5) / 0.5)), dim=-1)
        txt = F.normalize(reward.clip_features(model.get_text_features(input_ids=ids)), dim=-1)
        loss = contrastive_loss(img, txt, caps, texts, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 100 == 0 or it == steps - 1:
            tqdm.write(f"step {it} | loss {loss.item():.4f} | logit_scale {model.logit_scale.exp().item():.1f}")
    tmp = out.rstrip("/") + ".tmp"
    model.save_pretrained(tmp), tokenizer.save_pretrained(tmp), processor.save_pretrained(tmp)
    acc = heldout_accuracy(reward.make_reward(f"toyclip@{tmp}"), eval_pairs)  # the public loader
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"wrote {out} in {time.time() - t0:.0f}s | {captions} captions | held-out exact caption vs corrupted "
          f"caption: {acc:.3f}")


if __name__ == "__main__":
    main()
