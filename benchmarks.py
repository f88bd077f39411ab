"""
Prompt sets and GenEval's file layout: what eval.py needs to score any model the way papers do.

    read_prompt_set(spec)    -> [dict(prompt, tag, metadata)]: a .txt file (one prompt per line, blank lines
                                skipped), a .jsonl file (one object per line with a "prompt" field and optionally
                                a "tag" or "category"; the object is kept as the prompt's metadata), or a named set
    write_geneval(...)       GenEval's layout for one model: DIR/<index:05d>/metadata.jsonl and samples/<k:05d>.png,
                                as djghosh13/geneval's generation/diffusers_generate.py writes it and
                                evaluation/evaluate_images.py reads it (one folder per prompt, its sample files)
    read_geneval(path, dirs) -> per model folder, {(index, k): correct} from evaluate_images.py's results JSONL

Named sets (assets/prompts/, with their source and licence):
    geneval    GenEval's 553 prompts with their metadata (prompts/evaluation_metadata.jsonl of djghosh13/geneval at
               af4902f, MIT: geneval.LICENSE). Scoring needs GenEval's own detector (mmdet, Mask2Former weights),
               installed apart: run it on the folders eval.py --geneval_out writes, then pass its results file
               back with --geneval_results.
DrawBench (Saharia et al. 2022) is not shipped: its source is a spreadsheet linked from the Imagen page, with no
licence stated; a copy as .jsonl with "prompt" and "category" fields reads as any prompt file.
"""
import json
import os

import numpy as np

SETS = {"geneval": os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "prompts", "geneval.jsonl")}


class PromptSetError(ValueError):
    """An unreadable or malformed prompt set: eval.py prints it as one line."""


def read_prompt_set(spec):
    """A named set, a .txt or a .jsonl file -> [dict(prompt, tag, metadata)] in file order ("" tag where none)."""
    path = SETS.get(spec, spec)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptSetError(f"cannot read {path!r} ({getattr(e, 'strerror', None) or e}); expected a .txt or .jsonl "
                             f"file or one of: {', '.join(SETS)}")
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            items.append(dict(prompt=line.strip(), tag="", metadata=dict(prompt=line.strip())))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{path}:{n}: not JSON ({e.msg})")
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise PromptSetError(f"{path}:{n}: expected an object with a non-empty \"prompt\" string")
        items.append(dict(prompt=obj["prompt"], tag=str(obj.get("tag", obj.get("category", ""))), metadata=obj))
    if not items:
        raise PromptSetError(f"{path!r} holds no prompts")
    return items


def write_geneval(folder, items, seeds, images):
    """GenEval's layout of one model's images: images (B,3,H,W) in [0,1], row i the prompt items[i // seeds] with
    seed i % seeds -> folder/<index:05d>/metadata.jsonl (its metadata object) and samples/<seed:05d>.png."""
    from PIL import Image
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, item in enumerate(items):
        d = os.path.join(folder, f"{i:05d}")
        os.makedirs(os.path.join(d, "samples"), exist_ok=True)
        with open(os.path.join(d, "metadata.jsonl"), "w", encoding="utf-8") as f:
            json.dump(item["metadata"], f)
        for k in range(seeds):
            Image.fromarray(np.ascontiguousarray(arr[i * seeds + k])).save(os.path.join(d, "samples", f"{k:05d}.png"))


def read_geneval(path, folders):
    """evaluate_images.py's results (JSON lines with "filename" and "correct") -> {folder: {(index, k): correct}} for
    the images under each of `folders` (the layout write_geneval wrote); others are left out."""
    found = {f: {} for f in folders}
    try:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptSetError(f"cannot read GenEval results {path!r} ({getattr(e, 'strerror', None) or e})")
    for r in rows:
        parts = os.path.normpath(str(r.get("filename", ""))).split(os.sep)
        if len(parts) < 4 or parts[-2] != "samples" or "correct" not in r:
            raise PromptSetError(f"{path}: a line without filename .../<index>/samples/<k>.png and correct: {r}")
        for f in folders:  # matched by the folder's last part (the model's label) and the layout below it
            if parts[-4] == os.path.basename(os.path.normpath(f)):
                found[f][int(parts[-3]), int(os.path.splitext(parts[-1])[0])] = bool(r["correct"])
    return found
