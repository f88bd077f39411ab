"""
Rewards: one signature for every judge,

    reward_fn(images (B,3,H,W) float in [0,1], prompts list of B str) -> (rewards (B,) float in [0,1], info)

chosen by name through make_reward(name, device). Here: `compositional`, the exact judge of the toy
world (the analogue of GenEval, arXiv 2310.11513): detect objects, check the caption's constraints.
"""
import torch

import toyworld

# The constraints a caption makes, GenEval-style, each worth the same partial credit:
#   single   "a red circle"                     object present
#   binding  "a red circle and a blue square"   each object present (right colour on the right shape)
#   counting "three green triangles"            object present, exact count
#   spatial  "a red circle left of a blue sq."  each object present, relation holds for some pair


def _relation_holds(rel, a, b):
    """Object a stands in `rel` to object b: the relation's axis dominates (toyworld's own test)."""
    return toyworld._relation_ok(rel, (a["cx"], a["cy"]), (b["cx"], b["cy"]))


def constraints(spec, objects):
    """Spec + detected objects -> {constraint name: 0.0 or 1.0}."""
    out = {}
    matches = []
    for n, colour, shape in spec.items:
        found = [o for o in objects if o["colour"] == colour and o["shape"] == shape]
        matches.append(found)
        out[f"present:{colour} {shape}"] = float(len(found) > 0)
        if spec.skill == "counting":
            out[f"count:{n} {colour} {shape}"] = float(len(found) == n)
    if spec.skill == "spatial":
        out[f"relation:{spec.relation}"] = float(any(_relation_holds(spec.relation, a, b)
                                                     for a in matches[0] for b in matches[1]))
    return out


def compositional(images, prompts):
    """The exact toy-world judge. info: 'constraints' (per image dict), 'skill' (per image), 'objects'."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if images.shape[-2:] != (toyworld.SIZE, toyworld.SIZE):
        images = torch.nn.functional.interpolate(images.float(), size=(toyworld.SIZE,) * 2, mode="area")
    specs = [toyworld.parse(p) for p in prompts]
    objects = toyworld.detect(images)
    cons = [constraints(s, o) for s, o in zip(specs, objects)]
    rewards = torch.tensor([sum(c.values()) / len(c) for c in cons])
    return rewards, {"constraints": cons, "skill": [s.skill for s in specs], "objects": objects}


REWARDS = {"compositional": lambda device: compositional}


def make_reward(name, device="cpu"):
    """Name -> reward_fn. Unknown names fail with the list of known ones."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} (known: {', '.join(REWARDS)})")
    return REWARDS[name](device)
