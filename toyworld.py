"""
The toy world: procedural 32x32 scenes of coloured shapes, their captions, a detector, and the builders of the
built-in toy model (its word-level tokenizer and a random-init pipe to pretrain).

It stands in for the web images + GenEval of the paper (arXiv 2502.12146) so that everything runs on a CPU with no
downloads: scenes are drawn from a caption grammar covering the three skills of compositional benchmarks, and a
detector reads any image back into objects, so a reward can check a caption exactly.

    single    "a red circle"
    binding   "a red circle and a blue square"
    counting  "three green triangles"                       (2..4 objects)
    spatial   "a red circle left of a blue square"          (left of / right of / above / below)

Held-out prompts: some unordered (colour shape, colour shape) pairs never appear together in a training caption
(neither bound nor in a relation), and some (count, colour, shape) triples are never counted. Every word is seen in
training, only the combinations are new.
"""
import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
COLORS = {  # corners of the RGB cube: every pair is >= 1.0 apart, and >= 1.0 from the white background
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
BACKGROUND = (1.0, 1.0, 1.0)
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
SKILLS = ("single", "binding", "counting", "spatial")
SKILL_WEIGHTS = (0.15, 0.3, 0.25, 0.3)  # how often each skill is drawn for training scenes


@dataclass(frozen=True)
class Spec:
    """What a caption says. items: ((count, colour, shape), ...); relation relates items[0] to items[1]."""
    skill: str
    items: tuple
    relation: str = None


# -----------------------------------------------------------------------------
# captions <-> specs

def caption(spec):
    parts = [(f"{NUMBERS[n]} " if n else "") + f"{c} {s}" + ("s" if n != 1 else "") for n, c, s in spec.items]
    if spec.skill == "spatial":
        return f"{parts[0]} {spec.relation} {parts[1]}"
    return " and ".join(parts)


def parse(text):
    """Caption -> Spec. Raises ValueError naming the caption if it is outside the grammar."""
    words = text.strip().lower().split()
    def phrase(ws):
        number = {v: k for k, v in NUMBERS.items()}
        ws = ["some", *ws] if len(ws) == 2 else ws  # a plural without a number (alt-text's "red circles"): n = 0, 2+
        if len(ws) != 3 or ws[0] not in {**number, "some": 0} or ws[1] not in COLORS:
            raise ValueError(f"not a toy-world caption: {text!r}")
        n, shape = {**number, "some": 0}[ws[0]], ws[2]
        if n != 1:
            shape = shape[:-1] if shape.endswith("s") else "?"
        if shape not in SHAPES:
            raise ValueError(f"not a toy-world caption: {text!r}")
        return (n, ws[1], shape)
    joined = " ".join(words)
    for rel in RELATIONS:
        if f" {rel} " in joined:
            a, b = joined.split(f" {rel} ")
            return Spec("spatial", (phrase(a.split()), phrase(b.split())), rel)
    if "and" in words:
        i = words.index("and")
        return Spec("binding", (phrase(words[:i]), phrase(words[i + 1:])))
    item = phrase(words)
    return Spec("counting" if item[0] != 1 else "single", (item,))


def all_specs():
    """Every caption the grammar can say, in a fixed order."""
    objs = list(itertools.product(COLORS, SHAPES))
    specs = [Spec("single", ((1, c, s),)) for c, s in objs]
    specs += [Spec("binding", ((1, *a), (1, *b))) for a, b in itertools.permutations(objs, 2)]
    specs += [Spec("counting", ((n, c, s),)) for n in (2, 3, 4) for c, s in objs]
    specs += [Spec("spatial", ((1, *a), (1, *b)), r) for a, b in itertools.permutations(objs, 2) for r in RELATIONS]
    return specs


def _heldout_sets():
    rng = random.Random(1234)  # fixed forever: changing it changes what "held-out" means
    objs = list(itertools.product(COLORS, SHAPES))
    pairs = sorted((frozenset(p) for p in itertools.combinations(objs, 2)), key=sorted)
    held_pairs = set(rng.sample(pairs, 16))  # 16 of 153 unordered pairs, then 9 of 54 counted objects
    return held_pairs, set(rng.sample([(n, c, s) for n in (2, 3, 4) for c, s in objs], 9))

HELD_PAIRS, HELD_TRIPLES = _heldout_sets()


def is_heldout(spec):
    if spec.skill == "counting":
        return spec.items[0] in HELD_TRIPLES
    if len(spec.items) == 2:
        return frozenset(it[1:] for it in spec.items) in HELD_PAIRS
    return False


_SPECS = {k: [s for s in all_specs() if is_heldout(s) == (k == "heldout")] for k in ("train", "heldout")}


def train_prompts():
    return [caption(s) for s in _SPECS["train"]]


def heldout_prompts():
    return [caption(s) for s in _SPECS["heldout"]]


def eval_prompts(split="heldout", per_skill=16):
    """A fixed, skill-balanced subset of a split (the same list every call)."""
    rng, out = random.Random(0), []
    for skill in SKILLS:
        specs = [s for s in _SPECS[split] if s.skill == skill]
        out += [caption(s) for s in rng.sample(specs, min(per_skill, len(specs)))]
    return out


def random_spec(rng, split="train"):
    """A training caption: a skill by SKILL_WEIGHTS, then uniform within the skill."""
    skill = rng.choices(SKILLS, SKILL_WEIGHTS)[0]
    return rng.choice([s for s in _SPECS[split] if s.skill == skill] or _SPECS[split])


def corrupt(spec, rng):
    """A caption that describes its image imperfectly (web alt-text noise): one field changed."""
    fields = ["colour", "shape"] + ["count"] * (spec.skill == "counting") + ["relation"] * bool(spec.relation)
    while True:
        items = [list(it) for it in spec.items]
        i, what = rng.randrange(len(items)), rng.choice(fields)
        relation = spec.relation
        if what == "relation":
            relation = rng.choice([r for r in RELATIONS if r != spec.relation])
        elif what == "count":
            items[i][0] = rng.choice([n for n in (2, 3, 4) if n != items[i][0]])
        else:
            j, pool = (1, COLORS) if what == "colour" else (2, SHAPES)
            items[i][j] = rng.choice([x for x in pool if x != items[i][j]])
        new = Spec(spec.skill, tuple(map(tuple, items)), relation)
        # two items must stay distinct objects, and noise must not leak held-out captions into training
        if (len(items) == 1 or items[0][1:] != items[1][1:]) and (is_heldout(spec) or not is_heldout(new)):
            return new


# pretraining captions as web alt-text describes a scene: under-specified more than wrong, exact captions rare
# (counts and relations most of all). Per scene one form is drawn with these probabilities for its skill; the
# rest of the captions are exact. Chosen so that the converged model is misaligned (docs/notes.md, 2026-12-01).
ALT_TEXT = {"single": {"wrong field": 0.2},                       # exact 0.8
            "binding": {"one object": 0.7, "wrong field": 0.2},   # exact 0.1
            "counting": {"no count": 0.7, "wrong field": 0.2},    # exact 0.1
            "spatial": {"one object": 0.3, "no relation": 0.4, "wrong field": 0.2}}  # exact 0.1
# one object: one of the two objects is named ("a red circle"); no count: "red circles"; no relation: a spatial
# scene as a binding caption ("a red circle and a blue square"); wrong field: one colour, shape, count or
# relation is wrong (corrupt)


def alt_text(spec, rng):
    """(caption, form) of a pretraining scene: form in ALT_TEXT[spec.skill] or "exact". Held-out pairs and
    counted objects are never named."""
    u = rng.random()
    for form, p in ALT_TEXT[spec.skill].items():
        if (u := u - p) < 0:
            break
    else:
        return caption(spec), "exact"
    if form == "wrong field":
        return caption(corrupt(spec, rng)), form
    if form == "one object":
        return caption(Spec("single", (spec.items[rng.randrange(2)],))), form
    if form == "no count":
        return f"{spec.items[0][1]} {spec.items[0][2]}s", form
    return caption(Spec("binding", spec.items)), form  # no relation


# -----------------------------------------------------------------------------
# rendering

def _mask(shape, x0, y0, s):
    """Boolean (SIZE, SIZE) mask of a shape whose s x s bounding box has top-left corner (x0, y0)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres
    u, v = (xx - x0) / s, (yy - y0) / s  # coordinates inside the box, in [0, 1]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return inside
    return inside & (np.abs(u - 0.5) <= 0.5 * v)  # upright triangle, apex at top


def relation_ok(rel, a, b, margin=0):
    """Does box-centre a stand in `rel` to b? The relation's axis must dominate the other axis."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    d = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel]
    other = abs(dy) if rel in ("left of", "right of") else abs(dx)
    return d > other + margin


def render(spec, rng):
    """Spec -> (image float32 (3,SIZE,SIZE) in [0,1], [(colour, shape, cx, cy), ...]). Non-overlapping."""
    objects = [(c, s) for n, c, s in spec.items for _ in range(n)]
    hi = 12 if len(objects) <= 2 else 11 - (len(objects) == 4)  # box sizes 8..hi-1 pixels
    def clear(a, b):  # a 2-pixel gap between boxes keeps objects (even of one colour) separate blobs
        return a[0] >= b[0] + b[2] + 2 or b[0] >= a[0] + a[2] + 2 or a[1] >= b[1] + b[2] + 2 or b[1] >= a[1] + a[2] + 2
    for _ in range(1000):  # place objects one by one; start over if one finds no room
        boxes = []
        for _obj in objects:
            for _ in range(50):
                s = int(rng.integers(8, hi))
                box = (int(rng.integers(1, SIZE - s)), int(rng.integers(1, SIZE - s)), s)
                if all(clear(box, b) for b in boxes):
                    boxes.append(box)
                    break
        centres = [(x + s / 2, y + s / 2) for x, y, s in boxes]
        if len(boxes) == len(objects) and (not spec.relation or relation_ok(spec.relation, *centres[:2], margin=4)):
            break
    else:
        raise RuntimeError(f"could not place {caption(spec)!r}")  # not reached for this grammar
    image = np.tile(np.array(BACKGROUND, np.float32)[:, None, None], (1, SIZE, SIZE))
    for (c, s), (x, y, sz) in zip(objects, boxes):
        image[:, _mask(s, x, y, sz)] = np.array(COLORS[c], np.float32)[:, None]
    return image, [(c, s, x + sz / 2, y + sz / 2) for (c, s), (x, y, sz) in zip(objects, boxes)]


def sample_scene(seed, split="train"):
    """Seed -> (image float tensor (3,32,32) in [0,1], caption). Same seed, same scene."""
    rng = np.random.default_rng(seed)
    spec = random_spec(random.Random(int(rng.integers(2**31))), split)
    image, _ = render(spec, rng)
    return torch.from_numpy(image), caption(spec)


# -----------------------------------------------------------------------------
# detection: colour segmentation -> connected components -> shape from geometry

PALETTE = torch.tensor([BACKGROUND] + list(COLORS.values()))  # (7, 3), index 0 is background
NAMES = [None] + list(COLORS)
MAX_DIST = 0.45  # a pixel farther than this from every palette colour is ignored (edges, mud)
MIN_AREA = 10  # smaller blobs are noise: the smallest rendered object covers ~30 pixels


def _components(cls):
    """cls (B,H,W) int, 0 = background -> labels (B,H,W): 4-connected same-class pixels share a label."""
    B, H, W = cls.shape
    fg = cls > 0
    labels = torch.where(fg, torch.arange(1, H * W + 1).view(1, H, W).expand(B, H, W), 0)
    while True:  # propagate the max label to 4-neighbours of the same class until nothing changes
        new = labels.clone()
        for dim, shift in ((1, 1), (1, -1), (2, 1), (2, -1)):
            nb, nb_cls = torch.roll(labels, shift, dim), torch.roll(cls, shift, dim)
            edge = torch.zeros_like(fg)  # torch.roll wraps around: forbid the wrapped row/column
            edge.select(dim, 0 if shift == 1 else cls.shape[dim] - 1).fill_(True)
            ok = fg & (nb_cls == cls) & ~edge
            new = torch.where(ok, torch.maximum(new, nb), new)
        if torch.equal(new, labels):
            return labels
        labels = new


def detect(images):
    """images (B,3,H,W) in [0,1] -> per image a list of dicts: colour, shape, cx, cy, area (pixels)."""
    images = images.detach().float().cpu()
    dist = torch.cdist(images.permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3), PALETTE)  # (B,HW,7)
    d, cls = dist.min(-1)
    cls = torch.where(d <= MAX_DIST, cls, 0).view(images.shape[0], *images.shape[2:])
    labels = _components(cls)
    out = []
    for b in range(images.shape[0]):
        objs = []
        for lab in labels[b][labels[b] > 0].unique():  # 0: background
            ys, xs = torch.nonzero(labels[b] == lab, as_tuple=True)
            area = len(xs)
            if area < MIN_AREA:
                continue
            w, h = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
            fill = area / (w * h)  # square ~1.0, circle ~pi/4, triangle ~1/2
            shape = "triangle" if fill < 0.66 else "circle" if fill < 0.9 else "square"
            objs.append(dict(colour=NAMES[int(cls[b, ys[0], xs[0]])], shape=shape, area=area,
                             cx=(xs.min() + xs.max() + 1).item() / 2, cy=(ys.min() + ys.max() + 1).item() / 2))
        out.append(objs)
    return out


# -----------------------------------------------------------------------------
# the built-in toy model: its tokenizer and a fresh random-init pipe (train.py --method=pretrain)

def new_toy_tokenizer(max_length=12):
    """Word-level tokenizer over every toy-world caption word: <bos> words <eos>, padded to max_length."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for c in train_prompts() + heldout_prompts() for w in c.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "<bos>", "<eos>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=max_length)


def new_toy_model(seed=0, flow=False):
    """A fresh, random-init toy pipe: pixel-space 32x32x3 UNet, word-level tokenizer, tiny CLIP text
    encoder, v-prediction cosine-schedule DDIM (v-prediction measured better than epsilon here); flow=True:
    the same networks as a rectified flow (velocity target, FlowMatchEulerDiscreteScheduler, no shift)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from models import Pipe  # lazy: models.py never imports this file
    torch.manual_seed(seed)
    tokenizer = new_toy_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=64, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8)  # cross-attention at 8x8 only: half the cost
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0) if flow else DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
        prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True)
    return Pipe(unet, text_encoder.eval().requires_grad_(False), tokenizer, scheduler)
