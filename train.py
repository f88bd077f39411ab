"""
Training: pretraining of the built-in toy model (and, next, Diffusion-Sharpening on top of it).

    python train.py --method=pretrain                                  # CPU, the built-in toy model
    python train.py --method=pretrain --device=cuda                    # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --method=pretrain --device=cuda
    python train.py --method=pretrain --init_from=resume               # continue out_dir/ckpt.pt

The built-in model (assets/toy-model) is exactly:
    python train.py --method=pretrain --out_dir=out/pretrain --save_to=assets/toy-model
"""
import copy
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

import sample as S
import toyworld

# -----------------------------------------------------------------------------
# run
method = "pretrain"      # pretrain
out_dir = "out/pretrain" # ckpt.pt, log.txt, model/ go here
save_to = ""             # where the final diffusers folder goes ("" = out_dir/model)
init_from = "scratch"    # scratch | resume (out_dir/ckpt.pt)
seed = 1337
# data (toy world)
caption_noise = 0.1      # fraction of captions changed in one field (web alt-text noise)
caption_dropout = 0.1    # fraction of captions replaced by "" (for classifier-free guidance)
# optim
steps = 1300             # optimizer steps (~28 min on 2 CPU cores)
batch_size = 64          # images per optimizer step, over all ranks
lr = 1e-3                # AdamW peak learning rate
warmup = 100             # linear warmup steps, then cosine decay to lr/10
weight_decay = 0.0
grad_clip = 1.0
ema = 0.995              # EMA of the weights; the exported model is the EMA (0 = off)
# eval and logging
eval_interval = 325      # steps between held-out gold evaluations (0 = only at the end)
eval_seeds = 2           # seeds per held-out eval prompt (0 = no evaluation)
log_interval = 10
ckpt_interval = 250
# system
device = "cpu"           # cpu | cuda
threads = 0              # torch threads per process (0 = cores / processes)
# -----------------------------------------------------------------------------


def main():
    config = S.configure(globals(), sys.argv[1:])
    if method not in ("pretrain",):
        raise SystemExit(f"error: unknown method {method!r} (known: pretrain)")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but no CUDA device is available")

    # DDP, nanoGPT-style: the RANK env var (set by torchrun) decides
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device == "cuda" else "cpu"
    if ddp:
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    master = rank == 0
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    if batch_size % world:
        raise SystemExit(f"error: batch_size={batch_size} is not divisible by {world} processes")
    per_rank = batch_size // world
    if master:
        print(f"batch: {per_rank} images/rank x {world} ranks = {batch_size} per step, {steps} steps")
        os.makedirs(out_dir, exist_ok=True)
    assert per_rank * world == batch_size

    # model, optimizer, EMA
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    pipe = S.new_toy_model(seed)
    pipe.unet.to(dev).train().requires_grad_(True)
    pipe.text_encoder.to(dev).train().requires_grad_(True)  # the tiny text encoder learns with the UNet
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ema_params = [p.detach().clone() for p in params]
    step = 0
    if init_from == "resume":
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"error: --init_from=resume but {ckpt_path} does not exist")
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck["config"]["method"] != method:
            raise SystemExit(f"error: {ckpt_path} is a {ck['config']['method']!r} run, not {method!r}")
        pipe.unet.load_state_dict(ck["unet"])
        pipe.text_encoder.load_state_dict(ck["text_encoder"])
        opt.load_state_dict(ck["optimizer"])
        ema_params = [e.to(dev) for e in ck["ema"]]
        step = ck["step"]
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    elif init_from != "scratch":
        raise SystemExit(f"error: init_from must be 'scratch' or 'resume', got {init_from!r}")
    unet, text_encoder = pipe.unet, pipe.text_encoder
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        unet, text_encoder = DDP(unet), DDP(text_encoder)

    def lr_at(it):
        if it < warmup:
            return lr * (it + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, steps - warmup))))

    def batch(it):
        """Toy-world scenes of step `it` for this rank; seeds derived from (seed, step, index)."""
        images, prompts = [], []
        for i in range(rank * per_rank, (rank + 1) * per_rank):
            s = (seed * 1_000_003 + it) * 4096 + i
            image, cap = toyworld.sample_scene(s)
            rng = random.Random(s)
            if rng.random() < caption_noise:
                cap = toyworld.caption(toyworld.corrupt(toyworld.parse(cap), rng))
            images.append(image)
            prompts.append("" if rng.random() < caption_dropout else cap)
        return torch.stack(images).to(dev) * 2 - 1, prompts  # model space: [-1, 1]

    def export(folder):
        """The EMA weights as a diffusers folder."""
        ema_pipe = copy.deepcopy(pipe)
        for p, e in zip(list(ema_pipe.unet.parameters()) + list(ema_pipe.text_encoder.parameters()),
                        ema_params if ema else params):
            p.data.copy_(e)
        ema_pipe.unet.eval().cpu(), ema_pipe.text_encoder.eval().cpu()
        S.save_model(ema_pipe, folder)
        return ema_pipe

    def evaluate(tag):
        import eval as E
        ema_pipe = export(os.path.join(out_dir, "model"))
        ema_pipe.unet.to(dev), ema_pipe.text_encoder.to(dev)
        res = E.gold_eval(ema_pipe, seeds=eval_seeds)
        line = f"eval {tag} | step {step} | heldout gold {res['overall']:.4f} | " + \
            " | ".join(f"{k} {v:.4f}" for k, v in res["per_skill"].items())
        print(line)
        with open(os.path.join(out_dir, "log.txt"), "a") as f:
            f.write(line + "\n")

    from tqdm import tqdm
    bar = tqdm(total=steps, initial=step, disable=not master, desc=method, mininterval=5)
    torch.manual_seed(seed + rank)
    while step < steps:
        t0 = time.time()
        gen = torch.Generator().manual_seed(seed * 7919 + step * world + rank)  # resume-exact noise
        x0, prompts = batch(step)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (per_rank,), generator=gen).to(dev)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        ab = S.alpha_bars(pipe, t).view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        target, _ = S.training_target(pipe, x_t, x0, t)
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        cond = text_encoder(ids.to(dev))[0]
        loss = F.mse_loss(unet(x_t, t, cond).sample.float(), target.float())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p.detach(), 1 - ema)
        step += 1
        bar.update(1)
        if master and (step % log_interval == 0 or step == steps):
            line = (f"step {step} | loss {loss.item():.4f} | gnorm {gnorm.item():.3f} | "
                    f"lr {lr_at(step - 1):.2e} | dt {(time.time() - t0) * 1000:.0f}ms")
            bar.write(line)
            with open(os.path.join(out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")
        if master and (step % ckpt_interval == 0 or step == steps):
            ck = dict(unet=pipe.unet.state_dict(), text_encoder=pipe.text_encoder.state_dict(),
                      optimizer=opt.state_dict(), ema=ema_params, step=step, config=config)
            torch.save(ck, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash leaves the old or the new one
        if master and eval_seeds and ((eval_interval and step % eval_interval == 0) or step == steps):
            evaluate("end" if step == steps else "mid")
    bar.close()
    if master:
        export(save_to or os.path.join(out_dir, "model"))
        print(f"saved model to {save_to or os.path.join(out_dir, 'model')}")
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
