"""
Does a model use the relation word of a spatial prompt? For the spatial prompts of the study's fixed lists (eval.py's
prompts_and_seeds: held-out and train, 16 seeds each), sample each model, detect the two named objects (the first
detection of each) and, where both are drawn, count how often they stand in the asked relation, in the opposite one
("left of" for "right of") and in a perpendicular one (toyworld.relation_ok: the relation's axis dominates), for the
horizontal relations (left of, right of) and the vertical ones (above, below) apart. A model that ignores the word
places the pair in the asked and the opposite relation equally often. The text encoder's part: how far its output for
a prompt moves when the relation is swapped for the opposite one, over how far it moves when the second object's colour
is swapped (one token for one, after the relation: every token keeps its position).

    python dev/relation_probe.py assets/toy-model out/rA/grpo_x3/model out/rB/sft_x3/ckpt.pt   # ~1 min a model

A ckpt.pt of a full fine-tuning run is loaded into the model folder it trained from (its config's `model`): the UNet,
and the text encoder where the run trained it (--train_text_encoder); a LoRA run's: pass its exported model/ instead.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as E
import models as M
import sample as S
import toyworld

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PERPENDICULAR = {"left of": ("above", "below"), "right of": ("above", "below"),
                 "above": ("left of", "right of"), "below": ("left of", "right of")}
AXIS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}


def load(path):
    if not path.endswith(".pt"):
        return M.load_model(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    pipe = M.load_model(ckpt["config"]["model"])
    for module, state in zip((pipe.unet, pipe.text_encoder), ckpt["models"]):  # train.py's trained modules, UNet first
        module.load_state_dict(state)
    return pipe


def spatial_prompts(split, seeds=16):
    prompts, seed_list = E.prompts_and_seeds(split, 16, seeds)
    keep = [i for i, p in enumerate(prompts) if toyworld.parse(p).skill == "spatial"]
    return [prompts[i] for i in keep], [seed_list[i] for i in keep]


def probe(pipe, split):
    """-> {axis: counts of images, both objects drawn, and the pair in the asked / opposite / a perpendicular relation}"""
    return probe_prompts(pipe, *spatial_prompts(split))


def probe_prompts(pipe, prompts, seed_list):
    """probe() on these spatial prompts, prompts[i] sampled from seed_list[i]."""
    n = {axis: dict(images=0, both=0, asked=0, opposite=0, perpendicular=0) for axis in ("horizontal", "vertical")}
    for p, objects in zip(prompts, toyworld.detect(S.sample(pipe, prompts, seed_list))):
        spec = toyworld.parse(p)
        c = n[AXIS[spec.relation]]
        c["images"] += 1
        centres = [[(o["cx"], o["cy"]) for o in objects if (o["colour"], o["shape"]) == (col, s)] for _, col, s in spec.items]
        if not all(centres):
            continue
        a, b, rel = centres[0][0], centres[1][0], spec.relation
        c["both"] += 1
        c["asked"] += toyworld.relation_ok(rel, a, b)
        c["opposite"] += toyworld.relation_ok(OPPOSITE[rel], a, b)
        c["perpendicular"] += any(toyworld.relation_ok(q, a, b) for q in PERPENDICULAR[rel])
    return n


def other_colour(p):
    """p with its second object's colour replaced by the next palette colour (same tokens count, same positions)."""
    spec, names = toyworld.parse(p), list(toyworld.COLORS)
    (n, c, shape), items = spec.items[1], list(spec.items)
    items[1] = (n, names[(names.index(c) + 1) % len(names)], shape)
    return toyworld.caption(toyworld.Spec(spec.skill, tuple(items), spec.relation))


def encoder_ratio(pipe):
    """{axis: mean over its held-out spatial prompts of |e(p) - e(p, opposite relation)| / |e(p) - e(p, the second
    object's colour swapped)|}, e the conditioning the denoiser sees (models.encode)."""
    prompts = list(dict.fromkeys(spatial_prompts("heldout")[0]))
    rels = [toyworld.parse(p).relation for p in prompts]
    with torch.no_grad():
        e, opp, col = (M.encode(pipe, ps) for ps in (prompts, [p.replace(r, OPPOSITE[r]) for p, r in zip(prompts, rels)],
                                                     [other_colour(p) for p in prompts]))
    ratio = (e - opp).flatten(1).norm(dim=1) / (e - col).flatten(1).norm(dim=1)
    return {axis: ratio[[AXIS[r] == axis for r in rels]].mean().item() for axis in ("horizontal", "vertical")}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("| model | encoder: opposite / colour swap | split | relations | both drawn | asked | opposite | "
          "perpendicular |\n|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        pipe = load(path)
        ratio = encoder_ratio(pipe)
        for split in ("heldout", "train"):
            for axis, n in probe(pipe, split).items():
                print(f"| {path} | {ratio[axis]:.3f} | {split} | {axis} | {n['both']}/{n['images']} | " +
                      " | ".join(f"{n[k] / max(n['both'], 1):.3f}" for k in ("asked", "opposite", "perpendicular")) +
                      " |", flush=True)
