"""
Rewards: one signature for every judge,

    reward_fn(images (B,3,H,W) float in [0,1], prompts list of B str) -> (rewards (B,) float, info)

chosen by a string through make_reward(spec, device). A spec is `name`, `name@path` (a local weights
folder or URL instead of the default in WEIGHTS) or a weighted sum `toyclip:0.7,compositional:0.3`.

    compositional  the exact toy-world judge, GenEval-style (arXiv 2310.11513)         in [0, 1]
    toyclip        the toy world's learned CLIP (dev/toyclip.py), cosine similarity      in [-1, 1]
    clip           CLIPScore (arXiv 2104.08718): 2.5 * max(cos, 0), any CLIPModel folder   ~[0, 1]
    pickscore      PickScore (arXiv 2305.01569): logit_scale * cos, a CLIPModel folder     ~[15, 25]
    aesthetic      LAION aesthetic predictor: MLP head on CLIP ViT-L/14 image embeddings  ~[1, 10]
    mllm           an MLLM grader over OpenAI-compatible chat completions, 5-aspect rubric  in [0, 1]
    imagereward, hpsv2   adapter points: their packages pin versions that clash with ours (docs/results.md)

A score that could not be computed (a grader that failed) is NaN and counted in info["failed"]; it is
never replaced by a made-up value. Learned models load when their factory is called, on `device`.
"""
import base64
import concurrent.futures
import hashlib
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F

import toyworld

WEIGHTS = {  # default locations, relative to the working directory; override with name@path
    "toyclip": os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toyclip"),
    "clip": "weights/clip-vit-large-patch14",
    "pickscore": "weights/PickScore_v1",
    "aesthetic": "weights/aesthetic",
    "mllm": os.environ.get("MLLM_BASE_URL", "https://api.openai.com/v1"),
}
WHAT = {  # what belongs at each location, for the one-line error when it is missing
    "toyclip": "the toy CLIP folder that `python dev/toyclip.py` writes",
    "clip": "a transformers CLIPModel folder (config.json, weights, tokenizer files, preprocessor_config.json), "
            "e.g. openai/clip-vit-large-patch14",
    "pickscore": "the yuvalkirstain/PickScore_v1 CLIPModel folder plus the tokenizer and preprocessor files of "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "aesthetic": "clip/ (the openai/clip-vit-large-patch14 folder) and head.pth (LAION's "
                 "sac+logos+ava1-l14-linearMSE.pth or a linear head)",
}


class RewardError(ValueError):
    """Bad reward spec or missing weights: train.py and eval.py print it as one line."""


def _check(images, prompts):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


# -----------------------------------------------------------------------------
# compositional: the exact judge. Each constraint a caption makes is worth the same partial credit:
#   single   "a red circle"                     object present
#   binding  "a red circle and a blue square"   each object present (right colour on the right shape)
#   counting "three green triangles"            object present, exact count ("green triangles": two or more)
#   spatial  "a red circle left of a blue sq."  each object present, relation holds for some pair

def constraints(spec, objects):
    """Spec + detected objects -> {constraint name: 0.0 or 1.0}."""
    out, centres = {}, []
    for n, colour, shape in spec.items:
        found = [o for o in objects if o["colour"] == colour and o["shape"] == shape]
        centres.append([(o["cx"], o["cy"]) for o in found])
        out[f"present:{colour} {shape}"] = float(len(found) > 0)
        if spec.skill == "counting":
            out[f"count:{n or '2+'} {colour} {shape}"] = float(len(found) == n if n else len(found) >= 2)
    if spec.skill == "spatial":  # some pair whose relation's axis dominates (toyworld's own test)
        out[f"relation:{spec.relation}"] = float(any(toyworld.relation_ok(spec.relation, a, b)
                                                     for a in centres[0] for b in centres[1]))
    return out


def compositional(images, prompts):
    """The exact toy-world judge. info: 'constraints' (per image dict), 'skill' (per image), 'objects'."""
    _check(images, prompts)
    if images.shape[-2:] != (toyworld.SIZE, toyworld.SIZE):
        images = F.interpolate(images.float(), size=(toyworld.SIZE,) * 2, mode="area")
    specs = [toyworld.parse(p) for p in prompts]
    objects = toyworld.detect(images)
    cons = [constraints(s, o) for s, o in zip(specs, objects)]
    rewards = torch.tensor([sum(c.values()) / len(c) for c in cons])
    return rewards, {"constraints": cons, "skill": [s.skill for s in specs], "objects": objects}


# -----------------------------------------------------------------------------
# CLIP-family rewards: one loader for toyclip, CLIPScore, PickScore and the aesthetic head

def load_clip(folder, device="cpu", dtype=torch.float32):
    """A CLIPModel folder -> (model, tokenizer, image processor), frozen, on device."""
    import transformers
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar between our log lines
    model = CLIPModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval().requires_grad_(False)
    # preprocess reads the processor's settings alone; the PIL class, named, spares the torchvision warning
    return model, AutoTokenizer.from_pretrained(folder), CLIPImageProcessorPil.from_pretrained(folder)


def preprocess(images, proc):
    """The processor's own resize (shortest edge, bicubic), centre crop and normalisation, on tensors."""
    x = images.float()
    if proc.do_resize:
        s = proc.size.get("shortest_edge") or min(proc.size["height"], proc.size["width"])
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(round(h * s / min(h, w)), round(w * s / min(h, w))), mode="bicubic",
                          antialias=True, align_corners=False).clamp(0, 1)
    if proc.do_center_crop:
        ch, cw = proc.crop_size["height"], proc.crop_size["width"]
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
    if proc.do_normalize:
        x = (x - torch.tensor(proc.image_mean).view(1, 3, 1, 1)) / torch.tensor(proc.image_std).view(1, 3, 1, 1)
    return x


def clip_features(out):
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def clip_embed(model, tokenizer, proc, images, prompts):
    """Unit image and text embeddings (B, D) each."""
    dev, dtype = model.device, model.dtype
    img = clip_features(model.get_image_features(pixel_values=preprocess(images, proc).to(dev, dtype)))
    max_len = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt").input_ids.to(dev)
    txt = clip_features(model.get_text_features(input_ids=ids))
    return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)


def clip_reward(folder, device="cpu", weight=2.5, clamp=True, logit_scale=False):
    """CLIPScore = weight * max(cos, 0) (Hessel et al. use weight 2.5); PickScore = exp(logit_scale) * cos."""
    model, tokenizer, proc = load_clip(folder, device)

    @torch.no_grad()
    def reward_fn(images, prompts):
        _check(images, prompts)
        img, txt = clip_embed(model, tokenizer, proc, images, prompts)
        cos = (img * txt).sum(-1).cpu()
        scale = model.logit_scale.exp().item() if logit_scale else weight
        return scale * (cos.clamp(min=0) if clamp else cos), {"cos": cos}
    return reward_fn


def aesthetic_reward(folder, device="cpu"):
    """LAION aesthetic predictor: a stack of Linear layers (no activations, as LAION trained it; a single
    Linear for the older linear head) on the L2-normalised CLIP ViT-L/14 image embedding."""
    model, tokenizer, proc = load_clip(os.path.join(folder, "clip"), device)
    sd = torch.load(os.path.join(folder, "head.pth"), map_location="cpu", weights_only=True)
    keys = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith("weight")},
                  key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
    layers = [(sd[f"{k}.weight" if k != "weight" else "weight"].float().to(device),
               sd[f"{k}.bias" if k != "weight" else "bias"].float().to(device)) for k in keys]

    @torch.no_grad()
    def reward_fn(images, prompts):
        _check(images, prompts)
        pix = preprocess(images, proc).to(model.device, model.dtype)
        x = F.normalize(clip_features(model.get_image_features(pixel_values=pix)).float(), dim=-1)
        for w, b in layers:  # Dropout is identity at inference
            x = F.linear(x, w, b)
        return x.squeeze(-1).cpu(), {}
    return reward_fn


def adapter(package, why):
    """imagereward / hpsv2: their packages are not installed here; this is where they plug in."""
    def factory(path, device):
        raise RewardError(f"reward needs `pip install {package}`, which is not in requirements.txt: {why}. "
                          f"Install it beside ours at your own risk and register a reward_fn in reward.REWARDS")
    return factory


# -----------------------------------------------------------------------------
# mllm: a multimodal LLM as grader (the paper used GPT-4o), over OpenAI-compatible chat completions

RUBRIC = """You are grading an AI-generated image made for the prompt: "{prompt}".
Rate five aspects, each an integer from 0 to 10:
- prompt_fidelity: exactly the objects, attributes, counts and positions the prompt asks for
- creativity: an interesting, non-generic rendering of the prompt
- visual_quality: sharp, clean, well composed, free of artifacts
- consistency: coherent as a whole, nothing contradictory
- emotional_resonance: the image evokes the mood the prompt suggests
Answer with JSON only: {{"prompt_fidelity": _, "creativity": _, "visual_quality": _, "consistency": _, "emotional_resonance": _, "overall": _}}"""
ASPECTS = ("prompt_fidelity", "creativity", "visual_quality", "consistency", "emotional_resonance")


def parse_grade(text):
    """Grader answer -> (score in [0,1] or None, aspects dict). JSON (also inside prose or code fences):
    `overall`, else the mean of the aspects; otherwise a number out of 10 or 100 in free text."""
    m = re.search(r"\{.*\}", text or "", re.S)
    if m:
        try:
            d = json.loads(m.group(0))
            vals = {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            aspects = {k: vals[k] for k in ASPECTS if k in vals}
            raw = vals.get("overall", sum(aspects.values()) / len(aspects) if aspects else None)
            if raw is not None:
                top = 100.0 if max([raw] + list(aspects.values())) > 10 else 10.0
                return (min(max(raw / top, 0.0), 1.0) if 0 <= raw <= 100 else None), aspects
        except (ValueError, TypeError):
            pass
    m = re.search(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*(10|100)\b", text or "")
    if m and float(m.group(1)) <= float(m.group(2)):
        return float(m.group(1)) / float(m.group(2)), {}
    m = re.search(r"(?:score|rating|overall)\D{0,12}?(\d+(?:\.\d+)?)", text or "", re.I)
    if m and float(m.group(1)) <= 100:
        v = float(m.group(1))
        return v / (10.0 if v <= 10 else 100.0), {}
    return None, {}


def png_base64(image):
    """(3,H,W) in [0,1] -> base64 PNG string."""
    from PIL import Image
    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class MLLMGrader:
    """reward_fn over an OpenAI-compatible /chat/completions endpoint. Per-request timeout, `retries`
    retries with exponential backoff on timeouts, connection errors, 429 and 5xx; at most `concurrency`
    requests in flight; successful scores cached by (image hash, prompt, model). The API key is read
    from the environment variable `key_env` and never printed."""

    def __init__(self, base_url, model=None, key_env=None, timeout=60.0, retries=3, backoff=1.0, concurrency=8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model or os.environ.get("MLLM_MODEL", "gpt-4o")
        self.key_env = key_env or os.environ.get("MLLM_API_KEY_ENV", "OPENAI_API_KEY")
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.cache, self.lock = {}, threading.Lock()

    def _request(self, b64, prompt):
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 300, "messages": [{
            "role": "user", "content": [{"type": "text", "text": RUBRIC.format(prompt=prompt)},
                                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]}]})
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.key_env):
            headers["Authorization"] = "Bearer " + os.environ[self.key_env]
        req = urllib.request.Request(self.url, body.encode(), headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]

    def grade(self, image, prompt):
        """-> (score or None, aspects, error or None, attempts, cached)."""
        b64 = png_base64(image)
        key = (hashlib.sha256(b64.encode()).hexdigest(), prompt, self.model)
        with self.lock:
            if key in self.cache:
                return (*self.cache[key], None, 0, True)
        err = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                score, aspects = parse_grade(self._request(b64, prompt))
                if score is None:
                    return None, {}, "unparseable answer", attempt + 1, False  # asking again rarely helps
                with self.lock:
                    self.cache[key] = (score, aspects)
                return score, aspects, None, attempt + 1, False
            except urllib.error.HTTPError as e:  # before URLError: it is one
                err = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    break  # a client error does not heal by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                err = "timeout" if "timed out" in str(e) else f"connection error: {type(e).__name__}"
            except (KeyError, IndexError, ValueError, TypeError):
                err = "malformed response"
                break
        return None, {}, err, attempt + 1, False

    def __call__(self, images, prompts):
        _check(images, prompts)
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            results = list(pool.map(self.grade, images.cpu(), prompts))
        rewards = torch.tensor([float("nan") if r[0] is None else r[0] for r in results])
        errors = {i: r[2] for i, r in enumerate(results) if r[0] is None}
        return rewards, {"failed": len(errors), "errors": errors, "aspects": [r[1] for r in results],
                         "requests": sum(r[3] for r in results), "cached": sum(r[4] for r in results)}


# -----------------------------------------------------------------------------
# the registry: name -> factory(path, device)

REWARDS = {
    "compositional": lambda path, device: compositional,
    "toyclip": lambda path, device: clip_reward(path, device, weight=1.0, clamp=False),
    "clip": lambda path, device: clip_reward(path, device),
    "pickscore": lambda path, device: clip_reward(path, device, clamp=False, logit_scale=True),
    "aesthetic": aesthetic_reward,
    "mllm": lambda path, device: MLLMGrader(path),
    "imagereward": adapter("image-reward", "it pins timm 0.6.13 and fairscale and loads BLIP by its own code"),
    "hpsv2": adapter("hpsv2", "it needs open_clip and a pinned protobuf and fetches weights at run time"),
}


def parse_spec(spec):
    """'a:0.7,b@/path:0.3' -> [(name, path or None, weight)]. A weight is a trailing ':number'."""
    parts = []
    for item in str(spec).split(","):
        item, weight = item.strip(), 1.0
        head, _, tail = item.rpartition(":")
        if head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
            item, weight = head, float(tail)
        name, _, path = item.partition("@")
        if name not in REWARDS:
            raise RewardError(f"unknown reward {name!r} in {spec!r} (known: {', '.join(REWARDS)})")
        parts.append((name, path or None, weight))
    return parts


def make_reward(spec, device="cpu"):
    """Spec -> reward_fn. Missing weights fail here, with the path and what belongs there."""
    parts, fns = parse_spec(spec), []
    for name, path, weight in parts:
        path = path or WEIGHTS.get(name)
        if name in WHAT and not os.path.exists(path):
            raise RewardError(f"reward {name}: nothing at {path!r}; put there {WHAT[name]} (or pass {name}@/path)")
        fns.append(REWARDS[name](path, device))
    if len(parts) == 1 and parts[0][2] == 1.0:
        return fns[0]

    def combined(images, prompts):
        """sum_k weight_k * reward_k; info[name] holds each part's rewards and info."""
        total, info = torch.zeros(len(images)), {}
        for (name, _, weight), fn in zip(parts, fns):
            r, i = fn(images, prompts)
            total = total + weight * r.float().cpu()
            info[name] = dict(rewards=r, **i)
        info["failed"] = sum(v.get("failed", 0) for v in info.values())
        return total, info
    return combined
