"""
Training: Diffusion-Sharpening (arXiv 2502.12146; Alg. 1 = sharpen_sft, Alg. 2 = sharpen_rlhf), the
baselines it competes with (sft, diffusion_dpo, ddpo) and the pretraining of the built-in toy model.
The defaults are the variables below; config files and --key=value override them, later ones win.

    python train.py                                               # sharpen_rlhf, built-in toy model, CPU
    python train.py config/sharpen_sft.py --lam=0.1                # the SFT variant
    python train.py --device=cuda --model=/path/to/diffusers/folder --lora_rank=16 --dtype=bf16   # README, real models
    torchrun --standalone --nproc_per_node=8 train.py --device=cuda   # 8 GPUs (on CPU: 2 processes, gloo)
    python train.py --init_from=resume --out_dir=out/sharpen_rlhf    # continue out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=2 train.py config/pretrain_alttext.py   # the built-in model
"""
import collections
import contextlib
import copy
import datetime
import gc
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora as L
import sample as S
import sharpen
import toyworld
from reward import make_reward

# -----------------------------------------------------------------------------
# run
method = "sharpen_rlhf"  # sharpen_rlhf | sharpen_sft | pretrain | baselines: sft | raft | diffusion_dpo | ddpo | continued
model = S.TOY_MODEL      # the diffusers folder training starts from
out_dir = ""             # ckpt.pt, log.txt, model/ ("" = out/<method>)
save_to = ""             # where the final diffusers folder goes ("" = out_dir/model)
init_from = "scratch"    # scratch | resume (out_dir/ckpt.pt)
seed = 1337
# sharpening (the paper's n = 3 trajectories, m = 3 steps)
reward = "compositional" # reward name for make_reward
prompt_file = ""         # one train prompt per line ("" = toy-world captions); sharpen_rlhf / ddpo / diffusion_dpo
score_steps = "all"      # all: reward on the x0 prediction of every rolled step (Eq. 8) | last: the last one only
prompts_per_step = 32    # prompts per optimizer step, over all ranks and micro-steps (8: update noise lowers the reward)
grad_accum = 1           # micro-steps per optimizer step (no_sync on all but the last)
n_traj = 3               # trajectories per prompt (they differ in the noise that reaches x_t)
m_steps = 3              # DDIM steps rolled per trajectory, each scored on its x0 prediction
agg = "sum"              # trajectory reward: sum (Eq. 8; Eq. 11's gap R_w - R_l is then in 0..m) | mean (official; 0..1) | last
lam = 0.0                # path-integral temperature: 0 = argmax (the paper), inf = uniform
normalize = False        # z-score each prompt's trajectory rewards before the softmax
sft_t = "uniform"        # sft: noise levels: uniform (all timesteps) | sampler (DDIM steps as sharpen_sft's: start_range, m_steps)
sft_target = "exact"     # exact: eps from the noised x0 at every step | official: the first eps reused
dpo_target = "outcome"   # sharpen_rlhf's targets aim at: outcome (each trajectory's own last x0 prediction, so winner
                         # and loser differ in it, as Diffusion-DPO's pairs do) | start (the sample that was noised)
chain_grad = False       # backprop through the chain of m steps (the official code) instead of per step
beta = 5000.0            # Diffusion-DPO beta (the 1/2 inside: beta = 2 * official beta_dpo); 2 and 500 collapsed the toy model
reward_in_sigmoid = True # -log sigma(h - (R_w - R_l)) (the paper, Eq. 11) | -log sigma(h) + (R_w - R_l) (the official code)
start_range = "0.05:0.45"  # "a:b": rollouts start at DDIM step k, a <= k / num_steps <= b (1..9 of 20; "" = anywhere):
                         # not from pure noise (k = 0: blurry x0 predictions, uninformative rewards), and before content settles
num_steps = 20           # sampler schedule the trajectories follow (and RLHF's own samples use)
guidance = 1.0           # CFG scale of rollouts and samples (1.0: best for the toy model, half the NFE)
uncond_embed = "auto"    # CFG's unconditional input: auto (the folder's pipeline: zeros for SDXL, else "") | zeros | empty
resolution = 0           # image side in pixels (0: the model's own; FLUX: 1024)
eta = 0.0                # DDIM eta of rollouts
# baselines (at equal compute: nfe_budget)
dpo_pool = 256           # diffusion_dpo: train prompts the base model samples once, dpo_k images each
dpo_k = 2                # the best and worst of them make the prompt's preference pair
ppo_clip = 1e-4          # ddpo: ratio clip range (ddpo-pytorch's default)
ppo_epochs = 2           # ddpo: optimizer steps per sampled batch (the second sees a ratio != 1)
ddpo_fraction = 0.0      # ddpo: fraction of the sampler's steps each optimizer step trains (ddpo-pytorch's
                         # timestep_fraction; 0 = m_steps of them)
ddpo_eta = 1.0           # ddpo: DDIM eta of its sampler (the policy needs step noise to have a density)
raft_n = 4               # raft: samples per train prompt (the evaluation sampler); the best by the reward is trained on
raft_epochs = 2          # raft: optimizer steps each sampled round serves (each at fresh t and noise)
# pretraining (toy world) and its continuation (method continued: the UNet alone, from `model`)
flow = False             # pretrain: a rectified-flow toy model (velocity target, Euler sampler) instead of DDIM v-pred
captions = "alttext"     # pretraining captions: alttext (web-like, under-specified: toyworld.ALT_TEXT; assets/toy-model)
                         # | noisy (exact, caption_noise of them with one field wrong: the model before 2026-12-01)
caption_noise = 0.1      # noisy: fraction of captions changed in one field
caption_dropout = 0.1    # fraction of captions replaced by "" (for classifier-free guidance)
# optim
steps = 120              # optimizer steps (the default run: 11 min on 2 CPU cores, docs/results.md)
nfe_budget = 0           # > 0: steps = nfe_budget // UNet image-passes per step (equal compute across methods)
batch_size = 64          # pretraining images per optimizer step, over all ranks
lr = 1e-4                # AdamW peak learning rate (sharpen_rlhf at 32 prompts/step: 3e-4 and up collapse it, docs/notes.md)
warmup = 10              # linear warmup steps, then cosine decay to lr/10
weight_decay = 0.0
grad_clip = 1.0
max_bad_steps = 5        # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
ema = 0.0                # EMA of the weights, exported instead of them (0 = off)
# eval and logging
eval_interval = 0        # steps between held-out gold evaluations (0 = at start and end only)
eval_count = 0           # or this many evenly spaced ones during the run (convergence curves)
eval_seeds = 8           # seeds per held-out eval prompt (41 prompts x 8 = 328 images; 0 = no eval)
eval_split = "heldout"   # heldout | train | heldout,train: tune hyperparameters on train prompts, report held-out ones
log_interval = 1
probe_pairs = 32         # sharpen_rlhf: prompts of a fixed set of pairs never trained on; their implicit accuracy is logged
probe_interval = 10      # steps between those probes
profile = False          # add each phase's share of the step time to the log lines (dev/bench.py reads them)
ckpt_interval = 20
# real models (README, real models and 8 GPUs)
lora_rank = 0            # > 0: train LoRA adapters on the UNet's attention instead of all its weights
lora_alpha = 0.0         # LoRA scale alpha / rank (0 = rank)
dtype = "fp32"           # fp32 | bf16 | fp16: autocast dtype, and the dtype of every frozen module (fp16: CUDA + GradScaler)
grad_ckpt = False        # gradient checkpointing in the UNet (memory for compute)
compile = False          # torch.compile the trained UNet
# system
device = "cpu"           # cpu | cuda
threads = 0              # torch threads per process (0 = cores / processes)
ddp_timeout = 300        # seconds a rank waits for the others in a collective before it fails (a dead rank)
# -----------------------------------------------------------------------------
config = S.configure(globals(), sys.argv[1:])  # config files and --key=value, in order
out_dir = config["out_dir"] = out_dir or os.path.join("out", method)
METHODS = ("sharpen_rlhf", "sharpen_sft", "pretrain", "sft", "raft", "diffusion_dpo", "ddpo", "continued")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fault injection for the tests, all of it (env TRAIN_<KIND>=a,b,..: a rank dies at "rank:step", the loss of these
# steps is NaN, the checkpoint write at these steps fails (full disk) or is killed halfway, the run crashes after
# these steps; TRAIN_COUNT_SYNCS=1 counts DDP's gradient all-reduces)
FAULTS = {k: os.environ.get("TRAIN_" + k, "").split(",") for k in
          ("KILL_RANK", "NAN_STEPS", "FAIL_CKPT_AT_STEP", "KILL_IN_CKPT_AT_STEP", "CRASH_AFTER_STEP", "COUNT_SYNCS")}
fault = lambda kind, at: str(at) in FAULTS[kind]
bar = None  # the progress bar, closed before an error so that the error gets a line of its own


def fail(msg):
    if bar is not None:
        bar.close()
    raise SystemExit(f"error: {msg}")


def ddpo_steps():
    """How many of the sampler's num_steps - 1 stochastic steps one ddpo optimizer step trains."""
    return max(1, round(ddpo_fraction * (num_steps - 1))) if ddpo_fraction else min(m_steps, num_steps - 1)


def nfe_per_step():
    """Planned UNet cost per optimizer step, all ranks, in image forward passes: CFG counts 2, a pass with
    grad counts 3 (forward + backward). The run also counts what it does (the `nfe` log column)."""
    c, P, n, m = S.passes_per_call(guidance, family), prompts_per_step, n_traj, m_steps
    return {"pretrain": 3 * batch_size, "sft": 3 * P, "continued": 3 * P,
            "sharpen_sft": P * (n * m * c + 3 * (1 if lam == 0 else n) * m),  # rollouts + selected, with grad
            "sharpen_rlhf": P * (num_steps * c + n * m * c + 3 * 2 * m + 2 * m),  # sample, rollouts, w/l x policy/ref
            "diffusion_dpo": P * (3 * 2 + 2),  # winner and loser through policy and reference (+ the pool, once)
            "ddpo": P * n * (num_steps * c / ppo_epochs + 3 * ddpo_steps() * c),  # a batch serves ppo_epochs steps
            "raft": P * (raft_n * num_steps * c / raft_epochs + 3)}[method]  # best of raft_n, plain loss


# every check that can fail runs here, before any heavy work
if method not in METHODS:
    fail(f"unknown method {method!r} (known: {', '.join(METHODS)})")
if not eval_split or set(eval_split.split(",")) - {"heldout", "train"}:
    fail(f"eval_split must be 'heldout', 'train' or both comma-separated, got {eval_split!r}")
for key, options in (("init_from", ("scratch", "resume")), ("dtype", tuple(DTYPES)),
                     ("dpo_target", ("start", "outcome")), ("sft_target", ("exact", "official")),
                     ("score_steps", ("all", "last")), ("captions", ("noisy", "alttext")), ("sft_t", ("uniform", "sampler"))):
    if globals()[key] not in options:
        fail(f"{key} must be {' or '.join(map(repr, options))}, got {globals()[key]!r}")
if device == "cuda" and not torch.cuda.is_available():
    fail("--device=cuda but no CUDA device is available")
if method == "sharpen_rlhf" and n_traj < 2:
    fail(f"sharpen_rlhf needs n_traj >= 2 (a best and a worst trajectory), got {n_traj}")
if flow and method != "pretrain":
    fail("--flow builds a fresh flow toy model to pretrain (--method=pretrain); to train a flow model, pass its "
         "folder with --model")
if method != "sharpen_sft" and (lam != 0 or normalize):  # an ablation that silently changed nothing
    fail(f"lam={lam} normalize={normalize}: the path-integral weights (Eq. 9) select sharpen_sft's trajectories; "
         f"{method} does not use them (sharpen_rlhf trains each prompt's best vs worst trajectory, Eq. 11)")
if not 0 <= ddpo_fraction <= 1:
    fail(f"ddpo_fraction must be in [0, 1], got {ddpo_fraction}")
if method == "raft" and (raft_n < 2 or raft_epochs < 1):
    fail(f"raft needs raft_n >= 2 samples to choose from and raft_epochs >= 1, got {raft_n} and {raft_epochs}")
if not 1 <= m_steps <= num_steps:
    fail(f"m_steps={m_steps} must be in 1..num_steps={num_steps}")
if dtype == "fp16" and device != "cuda":
    fail("--dtype=fp16 needs --device=cuda (fp16 autocast + GradScaler); use bf16 on CPU")
try:
    k_range = sharpen.step_range(start_range, num_steps, m_steps)  # the start steps, room for m steps left
except ValueError:
    fail(f"start_range={start_range!r}: expected 'a:b' with 0 <= a <= b <= 1 (fractions of the schedule)")
if method == "sharpen_rlhf" and sft_target == "official" and dpo_target != "start":
    fail("--sft_target=official reuses the first noise, aimed at the sample that was noised: with sharpen_rlhf "
         "it needs --dpo_target=start (the outcome targets are exact by construction)")
if lora_rank < 0 or (lora_rank and method == "pretrain"):
    fail(f"lora_rank={lora_rank}: must be >= 0, and 0 for pretrain (LoRA adapts a trained UNet)")
file_prompts = []
if prompt_file:
    if method in ("pretrain", "sft", "continued", "sharpen_sft"):
        fail(f"--prompt_file with method {method}: it trains on dataset images, which only the toy world "
             "provides here; use sharpen_rlhf, ddpo or diffusion_dpo (they need prompts only)")
    try:
        file_prompts = [l.strip() for l in open(prompt_file, encoding="utf-8") if l.strip()]
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read prompt_file {prompt_file!r}: {getattr(e, 'strerror', None) or e}")
    if not file_prompts:
        fail(f"prompt_file {prompt_file!r} has no prompts (one per line)")
pretrain, reward_fn = method == "pretrain", None
if not pretrain:
    S.check_model_folder(model)
family = "sd" if pretrain else S.folder_family(model)  # FLUX's guidance costs no second pass
if nfe_budget > 0:  # diffusion_dpo's offline pool is paid from the same budget
    pool_cost = dpo_pool * dpo_k * num_steps * S.passes_per_call(guidance, family) if method == "diffusion_dpo" else 0
    steps = config["steps"] = max(1, int((nfe_budget - pool_cost) // nfe_per_step()))
if method not in ("pretrain", "sft", "continued"):
    try:
        reward_fn = make_reward(reward, device)
    except ValueError as e:
        fail(e)
ddp = int(os.environ.get("RANK", -1)) != -1  # DDP, nanoGPT-style: torchrun sets RANK
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0
per_step = batch_size if pretrain else prompts_per_step  # a prompt's n trajectories stay on one rank
if per_step % (world * grad_accum):
    fail(f"{'batch_size' if pretrain else 'prompts_per_step'}={per_step} is not divisible by "
         f"{world} ranks x grad_accum {grad_accum}")
P = per_step // (world * grad_accum)  # images (pretrain) or prompts per rank per micro-step
if master:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create out_dir {out_dir!r}: {e.strerror}")
    if not os.access(out_dir, os.W_OK):
        fail(f"out_dir {out_dir!r} is not writable")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from == "resume":  # the checkpoint's config, memory-mapped (cheap): a mismatch fails here
    if not os.path.exists(ckpt_path):
        fail(f"--init_from=resume but {ckpt_path} does not exist")
    try:
        old = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)["config"]
    except Exception as e:
        fail(f"cannot read {ckpt_path} ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})")
    changed = [k for k in ("method", "seed", "prompts_per_step", "n_traj", "m_steps", "batch_size", "lora_rank")
               if old.get(k) != config.get(k)]
    if changed:
        fail(f"{ckpt_path} is from another config: " + ", ".join(
            f"{k}={old.get(k)!r} there, {config.get(k)!r} here" for k in changed))

# -----------------------------------------------------------------------------
# setup: processes, model, optimizer, resume
dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device == "cuda" else "cpu"
if ddp:
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo",
                                         timeout=datetime.timedelta(seconds=ddp_timeout))
    if device == "cuda":
        torch.cuda.set_device(dev)
torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
if master:
    print(f"batch: {P} images x {grad_accum} micro-steps x {world} ranks = {per_step} per step" if pretrain else
          f"batch: {per_step} prompts per step, each the best of {raft_n} samples, sampled every {raft_epochs} "
          "steps" if method == "raft" else
          f"batch: {P} prompts x {n_traj} trajectories x {m_steps} steps per micro-step per rank; "
          f"{grad_accum} micro-steps x {world} ranks = {per_step} prompts = "
          f"{per_step * n_traj} trajectories = {per_step * n_traj * m_steps} scored x0 per step")
    print(f"compute: {nfe_per_step():.0f} UNet passes per step planned (grad x3) x {steps} steps = "
          f"{nfe_per_step() * steps:.0f}" + (f" (nfe_budget {nfe_budget})" if nfe_budget else ""))
# pretraining trains UNet + text encoder from scratch; the others train the UNet (all of it in fp32, or
# LoRA adapters in fp32 on a base in `dtype`); frozen modules stay in `dtype`
amp_dtype = DTYPES[dtype]
pipe = toyworld.new_toy_model(seed, flow) if pretrain else S.load_model(model, dev, amp_dtype, uncond_embed, resolution)
pipe.embedded_guidance = guidance  # FLUX-dev: --guidance is its guidance input, in rollouts and training passes
if S.is_flow(pipe) and (method == "ddpo" or eta > 0):
    fail(f"{model} is a flow-matching model: it samples deterministically (eta 0), and ddpo needs DDIM's "
         "stochastic step (Flow-GRPO's SDE form is not implemented); use the other methods")
pipe.unet.to(dev).train()
if lora_rank:
    params = L.add_lora(pipe.unet, lora_rank, lora_alpha, seed)
else:
    params = list(pipe.unet.float().requires_grad_(True).parameters())
trained = [pipe.unet]
if pretrain:
    trained.append(pipe.text_encoder.to(dev).train().requires_grad_(True))
    params += list(pipe.text_encoder.parameters())
if grad_ckpt:
    pipe.unet.enable_gradient_checkpointing()
ref_unet = None  # the frozen reference of the DPO losses: the base model (LoRA: adapters off)
if method in ("sharpen_rlhf", "diffusion_dpo"):
    ref_unet = L.Disabled(pipe.unet) if lora_rank else copy.deepcopy(pipe.unet).to(amp_dtype).eval().requires_grad_(False)
spent = dict(nfe=0, scored=0)  # UNet image-passes (grad x3) and images scored on this rank, counted where they happen
timing, t_fwd = collections.defaultdict(float), []  # --profile: seconds per phase this step


def clock():
    if device == "cuda":  # (profile only) GPU phases end where their kernels end
        torch.cuda.synchronize()
    return time.perf_counter()


@contextlib.contextmanager
def timed(key):
    if not profile:
        yield
        return
    t = clock()
    yield
    timing[key] += clock() - t


def count_pass(mod, args, kw):  # every UNet call, where it happens: image-passes, a pass with grad x3
    x = args[0] if args else kw.get("sample", kw.get("hidden_states"))  # a UNet's sample, a transformer's states
    spent["nfe"] += len(x) * (3 if torch.is_grad_enabled() else 1)
    if profile:
        t_fwd.append(clock())


def time_pass(mod, args, kw, out):
    timing["unet fwd"] += clock() - t_fwd.pop()


for net in (pipe.unet, None if lora_rank else ref_unet):  # LoRA's reference passes run through pipe.unet
    if net is not None:
        net.register_forward_pre_hook(count_pass, with_kwargs=True)
        if profile:
            net.register_forward_hook(time_pass, with_kwargs=True)
opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
ema_params = [p.detach().clone() for p in params] if ema else None
step, pool, rounds = 0, [], {}  # diffusion_dpo's offline pairs; ddpo's and raft's batch sampled by the old policy
if init_from == "resume":
    ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
    for m, sd in zip(trained, ck["models"]):
        m.load_state_dict(sd, strict=not lora_rank)  # a LoRA checkpoint holds the adapters only
    opt.load_state_dict(ck["optimizer"])
    ema_params, step, spent["nfe"], spent["scored"] = ck["ema"], ck["step"], ck["nfe"], ck.get("scored", 0)
    rounds.update(ck["rounds"] if "rounds" in ck else ck["ddpo_batch"])  # (its name before 2026-12-01)
    if master:
        print(f"resumed from {ckpt_path} at step {step}")
nets, syncs = trained, [0]
if ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    nets = [DDP(m) for m in trained]
    if fault("COUNT_SYNCS", 1):  # the no_sync check: how many gradient all-reduces DDP runs
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):
            syncs[0] += 1
            return allreduce_hook(None, bucket)
        nets[0].register_comm_hook(None, counting)
unet = torch.compile(nets[0]) if compile else nets[0]
amp = (lambda: torch.autocast(dev.split(":")[0], amp_dtype)) if dtype != "fp32" else contextlib.nullcontext
scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
uncond = S.uncond(pipe)
ts = S.timesteps(pipe, num_steps)  # the sampler schedule every trajectory follows (num_steps + 1,)
if master and method == "sharpen_sft" and m_steps > 1 and sft_target == "exact":  # rolled states, aimed at the render
    s_min = S.coeffs(pipe, ts[k_range[1] + m_steps - 1].view(1))[1].item()
    if s_min < 0.1:  # x_t off the line to x0: eps = (x_t - a x0) / s grows as 1/s (flow: v, the same)
        print(f"warning: sharpen_sft's rolled states reach noise level {s_min:.3f}, where the exact target toward the "
              "image grows as 1/noise; --sft_target=official or an earlier --start_range end keeps it bounded")


def lr_at(it):
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, steps - warmup))))


def seed_for(purpose, a, b=0):
    return sharpen.seed_for(seed, purpose, a, b)  # every random draw's seed (see there)


def train_prompt(g, rng=None):
    """Train prompt number g (global index), or one from rng: a skill-balanced toy-world caption (uniform
    would be 80 % spatial), or a line of prompt_file."""
    rng = rng or random.Random(seed_for("prompt", g))
    return file_prompts[rng.randrange(len(file_prompts))] if prompt_file else toyworld.caption(toyworld.random_spec(rng))


def first_index(it, micro):
    """Global index of this rank's first prompt in optimizer step it, micro-step micro: step it trains prompts
    it * per_step .. (it + 1) * per_step - 1 whatever the ranks and micro-steps."""
    return it * per_step + (micro * world + rank) * P


def scored_samples(prompts, seeds, eta_=0.0, net=None):
    """The current model's (or net's) samples of prompts from seeds, recorded, and their rewards."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = pipe.latent_shape
    traj = S.rollout(pipe, S.randn(shape, gens, dev), ts, S.encode(pipe, prompts), uncond, guidance,
                     eta_, gens, unet=net)
    with timed("decode"):
        images = S.to_images(pipe, traj.x_final)
    with timed("reward"):
        spent["scored"] += len(images)
        return traj, reward_fn(images, prompts)[0].float()


# -----------------------------------------------------------------------------
# the methods: each turns this rank's micro-step into (count, loss_fn): count = the prompts, pairs or
# images its loss averages over; loss_fn() -> (mean loss with grad, {log column: value})

def pretrain_loss(it, micro):
    """Denoising loss on toy-world scenes at uniform t. pretrain: the pretraining captions (`captions`, some
    empty for CFG), the text encoder trains too; continued: the same captions, the UNet alone (the control
    for "more training"); sft (the plain fine-tuning baseline): exact captions, the UNet alone."""
    images, prompts, web = [], [], method in ("pretrain", "continued")
    first = (micro * world + rank) * P
    for i in range(first, first + P):
        s = seed_for("scene", it, i)
        image, cap = toyworld.sample_scene(s)
        rng = random.Random(s)
        if web and captions == "alttext":
            cap = toyworld.alt_text(toyworld.parse(cap), rng)[0]
        elif web and rng.random() < caption_noise:
            cap = toyworld.caption(toyworld.corrupt(toyworld.parse(cap), rng))
        images.append(image)
        prompts.append("" if web and rng.random() < caption_dropout else cap)
    x0 = torch.stack(images).to(dev) * 2 - 1  # model space: [-1, 1]
    gen = torch.Generator().manual_seed(seed_for("t noise", (it * grad_accum + micro) * world + rank))
    t = S.train_timesteps(pipe, P, gen).to(dev)
    if method == "sft" and sft_t == "sampler":  # sharpen_sft's noise levels: its start step k per prompt, + j < m
        g0, j = first_index(it, micro), torch.randint(0, m_steps, (P,), generator=gen).tolist()
        t = torch.stack([ts[k + jj] for k, jj in zip(sharpen.start_steps(range(g0, g0 + P), k_range, seed), j)])
    cond = nets[1](S.tokenize(pipe, prompts).to(dev))[0] if pretrain else S.encode(pipe, prompts)
    return denoising_loss(x0, t, torch.randn(x0.shape, generator=gen).to(dev), cond), {}


def denoising_loss(x0, t, eps, cond):
    """The plain denoising loss: x0 noised to t with eps, the trained UNet's output against the exact target."""
    x_t = S.add_noise(pipe, x0, t, eps)
    target, _ = S.training_target(pipe, x_t, x0, t)
    return F.mse_loss(S.unet_call(pipe, unet, x_t, t, cond).float(), target.float())


def roll(gidx):
    """Algorithms 1 and 2 up to the rewards, for the prompts of global indices gidx, without a graph: each
    prompt's image (Alg. 1: a dataset render; Alg. 2: the model's own sample) is noised to a start step drawn
    per prompt; n trajectories from there roll m DDIM steps; the x0 prediction of every step is scored."""
    n, m = n_traj, m_steps
    prompts = [train_prompt(g) for g in gidx]
    cond = S.encode(pipe, prompts)  # (P, L, E), shared by the prompt's n trajectories
    shape = pipe.latent_shape
    if method == "sharpen_sft":  # Alg. 1: dataset images (toy-world renders of the prompts)
        x0 = S.from_images(pipe, torch.stack([torch.from_numpy(toyworld.render(toyworld.parse(p), np.random.default_rng(
            seed_for("render", g)))[0]) for p, g in zip(prompts, gidx)]))
    else:  # Alg. 2: the current model's own samples (no dataset)
        gens = [torch.Generator().manual_seed(seed_for("sample", g)) for g in gidx]
        x0 = S.rollout(pipe, S.randn(shape, gens, dev), ts, cond, uncond, guidance, eta, gens, record=False)
    ks = sharpen.start_steps(gidx, k_range, seed)  # the noise level per prompt; its n trajectories share it
    tsn = torch.stack([ts[k:k + m + 1] for k in ks]).repeat_interleave(n, 0)  # (P*n, m+1)
    gens = [torch.Generator().manual_seed(seed_for("noise", g, j)) for g in gidx for j in range(n)]
    eps0 = S.randn(shape, gens, dev)  # (P*n, C, H, W): the noise that reaches x_t
    x0n, condn = x0.repeat_interleave(n, 0), cond.repeat_interleave(n, 0)
    x_t = S.add_noise(pipe, x0n, tsn[:, 0], eps0)
    traj = S.rollout(pipe, x_t, tsn, condn, uncond, guidance, eta, gens)
    scored = traj.x0_pred if score_steps == "all" else traj.x0_pred[:, -1:]  # (P*n, m or 1, C, H, W)
    with timed("decode"):  # without a graph (latent models: the VAE)
        images = S.to_images(pipe, scored.flatten(0, 1))
    with timed("reward"):
        spent["scored"] += len(images)
        r, _ = reward_fn(images, [p for p in prompts for _ in range(n * scored.shape[1])])
    per_step_r = r.to(dev).view(len(gidx), n, scored.shape[1])  # a failed score is NaN: it drops out of selection
    # the exact per-step targets (P*n, m, C, H, W) aim at the image that was noised, or (sharpen_rlhf,
    # dpo_target=outcome) at each trajectory's own last x0 prediction, so winner and loser differ in it
    outcome = method == "sharpen_rlhf" and dpo_target == "outcome"
    target = S.state_targets(pipe, traj, traj.x0_pred[:, -1] if outcome else x0n)[0]
    if sft_target == "official":
        target = S.param_target(pipe, sharpen.official_eps_target(eps0, m).flatten(0, 1),
                                x0n.repeat_interleave(m, 0), traj.t.flatten()).view_as(target)
    last = per_step_r[:, :, -1]
    info = dict(reward=last.nanmean().item(), reward_std=last[last.isfinite()].std().nan_to_num(0).item(),
                failed=(~per_step_r.isfinite()).float().mean().item())
    return dict(R=sharpen.trajectory_rewards(per_step_r, agg), target=target, traj=traj, x_t=x_t, tsn=tsn,
                condn=condn, gens=gens, info=info)


def recompute(b, rows, net):
    """Model output with grad for the trajectories `rows` (K,) of roll's b at their m states: (K, m, C, H, W)."""
    if chain_grad:  # re-roll the chain with grad from x_t, through the same guided DDIM steps
        tr = S.rollout(pipe, b["x_t"][rows], b["tsn"][rows], b["condn"][rows], uncond, guidance, eta,
                       [b["gens"][i] for i in rows.tolist()], grad=True, unet=net)  # grad if enabled
        return tr.model_out.float()  # losses in fp32 whatever the autocast dtype
    traj = b["traj"]
    out = S.unet_call(pipe, net, traj.x[rows].flatten(0, 1), traj.t[rows].flatten(),
                      b["condn"][rows].repeat_interleave(m_steps, 0)).float()
    return out.view(len(rows), m_steps, *out.shape[1:])


def idle(b):
    """A zero-weight loss through the DDP module (a rank with nothing to train): its backward all-reduces like
    any other, so every rank issues the same collectives."""
    return recompute(b, torch.zeros(1, dtype=torch.long, device=dev), unet).sum() * 0.0


def sharpen_sft(gidx):
    """Algorithm 1: the denoising loss on the trajectories that the path-integral weights select (Eq. 9), as
    a mean over the prompts with a scored trajectory."""
    b = roll(gidx)
    w = sharpen.trajectory_weights(b["R"], lam, normalize)
    p_idx, n_idx = sharpen.select_rows(w)  # only trajectories with w > 0 need a forward
    rows, live = p_idx * n_traj + n_idx, int((w.sum(1) > 0).sum())
    info = dict(b["info"], w_max=w.max(1).values.mean().item())

    def loss_fn():
        if live == 0:
            return idle(b), info
        pred = recompute(b, rows, unet)
        return sharpen.sft_loss(pred, b["target"][rows], w, rows=(p_idx, n_idx)) * (len(gidx) / live), info
    return live, loss_fn, None


def sharpen_rlhf(gidx):
    """Algorithm 2: Diffusion-DPO on each prompt's best vs worst trajectory against the frozen reference, with
    the reward gap inside the sigmoid (Eq. 11). Ties (or < 2 scored trajectories) state no preference: skipped.
    Returns (pairs, loss_fn, h_fn): h_fn() -> (implicit accuracy, mean h) of the pairs now, without the gap."""
    b = roll(gidx)
    R, n = b["R"], n_traj
    iw, il = sharpen.best_worst(R)
    ar = torch.arange(len(gidx), device=R.device)
    ar = ar[R[ar, iw] > R[ar, il]]
    K = len(ar)
    rows = torch.cat([ar * n + iw[ar], ar * n + il[ar]])  # (2K,): winners then losers
    info = dict(b["info"], pairs=K / len(gidx))

    def dpo(net, R_w, R_l, in_sigmoid):
        mse = sharpen.trajectory_mse(recompute(b, rows, net), b["target"][rows])
        with torch.no_grad():
            ref = sharpen.trajectory_mse(recompute(b, rows, ref_unet), b["target"][rows])
        return sharpen.rlhf_loss(mse[:K], mse[K:], ref[:K], ref[K:], R_w, R_l, beta, in_sigmoid)

    def loss_fn():
        if K == 0:  # undefined columns are NaN: left out of the log's means
            return idle(b), dict(info, acc=math.nan, gap=math.nan)
        loss, d = dpo(unet, R[ar, iw[ar]], R[ar, il[ar]], reward_in_sigmoid)
        return loss, dict(info, acc=d["implicit_acc"].item(), gap=d["reward_gap"].item())

    @torch.no_grad()
    def h_fn():
        zero = torch.zeros(K, device=dev)
        d = dpo(pipe.unet, zero, zero, False)[1]
        return d["implicit_acc"].item(), d["inside"].item()
    return K, loss_fn, h_fn


def dpo_pool_pairs():
    """Offline preference pairs for diffusion_dpo: dpo_pool train prompts x dpo_k base-model samples (the
    reference is the base model, also after a resume), the best and worst of each prompt (ties dropped):
    (x_w, x_l, prompts). Every rank makes the whole pool."""
    rng = random.Random(seed_for("pool prompts", 0))
    prompts = [train_prompt(None, rng) for _ in range(dpo_pool)]
    xw, xl, kept = [], [], []
    for i in tqdm(range(0, dpo_pool, 32), desc="diffusion_dpo pool", disable=quiet):
        ps = prompts[i:i + 32]
        seeds = [seed_for("pool", (i + j) * dpo_k + k) for j in range(len(ps)) for k in range(dpo_k)]
        traj, r = scored_samples([p for p in ps for _ in range(dpo_k)], seeds, net=ref_unet)
        x, r = traj.x_final.view(len(ps), dpo_k, *traj.x_final.shape[1:]), r.view(len(ps), dpo_k)
        iw, il = sharpen.best_worst(r)
        for j in torch.nonzero(r[torch.arange(len(ps)), iw] > r[torch.arange(len(ps)), il]).flatten():
            xw.append(x[j, iw[j]]), xl.append(x[j, il[j]]), kept.append(ps[j])
    if not kept:  # the same on every rank (each makes the whole pool)
        fail(f"diffusion_dpo: the {dpo_k} samples of every one of the {dpo_pool} pool prompts tied (or were not "
             "scored): no preference pairs; raise dpo_pool or dpo_k, or use a reward that separates them")
    if master:
        tqdm.write(f"diffusion_dpo pool: {len(kept)} pairs from {dpo_pool} prompts x {dpo_k} samples")
    return torch.stack(xw), torch.stack(xl), kept


def dpo_loss(it, micro):
    """Diffusion-DPO (arXiv 2311.12908) on the offline pairs: one shared t and noise per pair."""
    if not pool:
        counted = dict(spent)
        pool.extend(dpo_pool_pairs())
        if it > 0:  # resumed: the checkpoint's counts hold the pool already (rebuilt here, the same pairs)
            spent.update(counted)
    xw, xl, prompts = pool
    first = first_index(it, micro)
    idx = torch.tensor([g % len(prompts) for g in range(first, first + P)])  # cycles through the pool
    gen = torch.Generator().manual_seed(seed_for("t noise", first))
    t = S.train_timesteps(pipe, P, gen).to(dev).repeat(2)
    x0 = torch.cat([xw[idx], xl[idx]])  # (2P, C, H, W): winners then losers
    x_t = S.add_noise(pipe, x0, t, torch.randn(xw[idx].shape, generator=gen).to(dev).repeat(2, 1, 1, 1))
    target, _ = S.training_target(pipe, x_t, x0, t)
    cond = S.encode(pipe, [prompts[i] for i in idx.tolist()]).repeat(2, 1, 1)
    mse = sharpen.row_mse(S.unet_call(pipe, unet, x_t, t, cond).float(), target)
    with torch.no_grad():
        ref = sharpen.row_mse(S.unet_call(pipe, ref_unet, x_t, t, cond).float(), target)
    zero = torch.zeros(P, device=dev)  # no reward gap: plain Diffusion-DPO
    loss, d = sharpen.rlhf_loss(mse[:P], mse[P:], ref[:P], ref[P:], zero, zero, beta, False)
    return loss, dict(acc=d["implicit_acc"].item())


def ddpo_loss(it, micro):
    """DDPO (Black et al. 2023, arXiv 2305.13301), PPO-clip on per-step DDIM log-probabilities: every
    ppo_epochs steps the current model samples n trajectories per prompt (eta = ddpo_eta); advantages
    are the rewards normalised within each prompt; each step trains on ddpo_steps() random timesteps."""
    n, key = n_traj, (it // ppo_epochs, micro)
    if key not in rounds:  # sample a new batch with the current (old) policy
        new_round(key)
        first = first_index(it // ppo_epochs, micro)
        prompts = [train_prompt(g) for g in range(first, first + P) for _ in range(n)]
        traj, r = scored_samples(prompts, [seed_for("noise", first, j) for j in range(P * n)], ddpo_eta)
        x_next = torch.cat([traj.x[:, 1:], traj.x_final[:, None]], 1)  # (B, steps, C, H, W)
        with torch.no_grad():  # the last step lands on x0 with sigma = 0: no density, left out
            lp = torch.stack([S.ddim_logprob(pipe, traj.x[:, k], traj.model_out[:, k], ts[k].expand(P * n),
                                             ts[k + 1].expand(P * n), ddpo_eta, x_next[:, k])
                              for k in range(num_steps - 1)], 1)
        rounds[key] = dict(x=traj.x, x_next=x_next, lp=lp, prompts=prompts, reward=r,
                                 adv=sharpen.group_advantages(r.view(P, n)).flatten())
    b = rounds[key]
    ks = torch.randperm(num_steps - 1, generator=torch.Generator().manual_seed(seed_for("ddpo t", it, micro)))[:ddpo_steps()]
    B, cond = len(b["prompts"]), S.encode(pipe, b["prompts"])
    loss = clipped = 0.0
    for k in ks.tolist():
        out = S.predict(pipe, b["x"][:, k], ts[k], cond, uncond, guidance, unet)
        lp = S.ddim_logprob(pipe, b["x"][:, k], out, ts[k].expand(B), ts[k + 1].expand(B), ddpo_eta, b["x_next"][:, k])
        l_k, c_k = sharpen.ppo_clip_loss(lp, b["lp"][:, k], b["adv"], ppo_clip)
        loss, clipped = loss + l_k / len(ks), clipped + c_k.item() / len(ks)
    return loss, dict(reward=b["reward"].nanmean().item(), clipfrac=clipped)


def new_round(key):
    """Forget the rounds sampled for earlier steps (ddpo, raft: a round serves the steps that share key[0])."""
    for old in [k for k in rounds if k[0] != key[0]]:
        del rounds[old]


def raft_loss(it, micro):
    """RAFT (Dong et al. 2023, arXiv 2304.06767), best-of-N distillation: every raft_epochs steps the current
    model samples raft_n images per train prompt with the evaluation sampler (eta 0, guidance); the best by the
    reward (failed scores never picked; a prompt with none scored drops out) is trained on with the plain
    denoising loss at uniform t. -> (prompts kept, loss_fn), the loss a mean over them."""
    key, N = (it // raft_epochs, micro), raft_n
    if key not in rounds:
        new_round(key)
        first = first_index(it // raft_epochs, micro)
        prompts = [train_prompt(g) for g in range(first, first + P)]
        traj, r = scored_samples([p for p in prompts for _ in range(N)],
                                 [seed_for("noise", first, j) for j in range(P * N)])
        R, ar = r.to(dev).view(P, N), torch.arange(P)
        best = sharpen.best_worst(R)[0]
        R_best = R[ar, best]
        live = torch.isfinite(R_best)
        x = traj.x_final.view(P, N, *traj.x_final.shape[1:])[ar, best]
        rounds[key] = dict(x0=x[live], prompts=[p for p, ok in zip(prompts, live.tolist()) if ok],
                           reward=R_best.nanmean().item())
    b = rounds[key]
    K = len(b["prompts"])
    gen = torch.Generator().manual_seed(seed_for("t noise", first_index(it, micro)))
    t = S.train_timesteps(pipe, max(K, 1), gen).to(dev)
    eps = torch.randn((max(K, 1), *b["x0"].shape[1:]), generator=gen).to(dev)

    def loss_fn():
        if K == 0:  # a zero-weight pass through the DDP module: every rank all-reduces alike
            return S.unet_call(pipe, unet, eps, t, uncond).float().sum() * 0.0, dict(best_reward=math.nan)
        return denoising_loss(b["x0"], t, eps, S.encode(pipe, b["prompts"])), dict(best_reward=b["reward"])
    return K, loss_fn


def batch(it, micro):
    """This rank's part of optimizer step it, micro-step micro: (count, loss_fn)."""
    if method in ("sharpen_sft", "sharpen_rlhf"):
        first = first_index(it, micro)
        return {"sharpen_sft": sharpen_sft, "sharpen_rlhf": sharpen_rlhf}[method](range(first, first + P))[:2]
    if method == "raft":
        return raft_loss(it, micro)
    loss = {"pretrain": pretrain_loss, "sft": pretrain_loss, "continued": pretrain_loss, "diffusion_dpo": dpo_loss,
            "ddpo": ddpo_loss}[method]
    return P, lambda: loss(it, micro)  # these average over all P items


# -----------------------------------------------------------------------------
# export, evaluation, logging, checkpoints

def export(folder):
    """The trained (or EMA) weights as a diffusers folder (save_model writes it atomically)."""
    out = copy.deepcopy(pipe)
    out.unet._forward_pre_hooks.clear(), out.unet._forward_hooks.clear()  # its passes are not training compute
    if ema_params is not None:  # the copy's parameters in the order of `params`
        copies = L.lora_parameters(out.unet) if lora_rank else \
            [p for m in (out.unet, out.text_encoder)[:len(trained)] for p in m.parameters()]
        for p, e in zip(copies, ema_params):
            p.data.copy_(e)
    adapters = L.diffusers_state_dict(out.unet, pipe.denoiser) if lora_rank else None  # a file for load_lora_weights
    if lora_rank:  # a plain diffusers UNet with the adapters folded in
        L.merge(out.unet)
    out.unet.eval(), out.text_encoder.eval()
    S.save_model(out, folder, lora=adapters)
    return out


def evaluate(tag):
    import eval as E
    model = export(os.path.join(out_dir, "model"))
    for split in eval_split.split(","):
        res = E.gold_eval(model, split=split, seeds=eval_seeds, num_steps=num_steps, guidance=guidance)
        proxy = "" if reward == "compositional" or reward_fn is None else \
            f" | {split} {reward} {reward_fn(res['images'], res['prompts'])[0].nanmean().item():.4f}"
        log(f"eval {tag} | step {step} | nfe {spent['nfe'] * world} | {split} gold {res['overall']:.4f} | n {res['n']} | " +
            " | ".join(f"{k} {v:.4f}" for k, v in res["per_skill"].items()) + proxy)


def log(line):
    tqdm.write(line)
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


def checkpoint():
    """out_dir/ckpt.pt, written beside and renamed into place: a crash leaves the old or the new one."""
    if not all(p.isfinite().all() for p in params):  # never write a poisoned state
        fail(f"non-finite weights at step {step}; not writing {ckpt_path} (it holds the last good state)")
    ck = dict(models=[{k: v for k, v in m.state_dict().items() if not lora_rank or ".lora_" in k} for m in trained],
              optimizer=opt.state_dict(), ema=ema_params, step=step, config=config, nfe=spent["nfe"],
              scored=spent["scored"], rounds=rounds)
    try:
        with open(ckpt_path + ".tmp", "wb") as f:
            torch.save(ck, f)
            if fault("FAIL_CKPT_AT_STEP", step):
                raise OSError(28, "No space left on device")
            if fault("KILL_IN_CKPT_AT_STEP", step):
                f.truncate(f.tell() // 2)
                os._exit(9)
            f.flush()
            os.fsync(f.fileno())
        os.replace(ckpt_path + ".tmp", ckpt_path)
        saved[0] = step
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(ckpt_path + ".tmp")
        old = f"the previous checkpoint (step {saved[0]}) is intact" if os.path.exists(ckpt_path) \
            else "there is no earlier checkpoint"
        fail(f"writing {ckpt_path} at step {step} failed ({e.strerror or e}); {old}")


quiet = not master or not sys.stderr.isatty()  # no progress bar in a redirected log
if master:  # a fresh run starts the log; a resumed one keeps its lines up to the checkpoint's step (not those after)
    path = os.path.join(out_dir, "log.txt")
    lines = open(path).readlines() if init_from == "resume" and os.path.exists(path) else []
    logged = [re.search(r"\bstep (\d+)", l) for l in lines]  # None: a line of no step (config, probe)
    open(path, "w").writelines(l for l, m in zip(lines, logged) if m is None or int(m[1]) <= step)
    # the resolved config, on screen and at the top of this run's part of the log
    log("config " + " ".join(f"{k}={v!r}" for k, v in config.items()))
probe = None  # sharpen_rlhf: fixed pairs never trained on (negative global indices): is the preference learned?
if method == "sharpen_rlhf" and probe_pairs and master:
    counts = dict(spent)
    with amp():  # after a resume: pairs of the resumed model
        probe = sharpen_rlhf(range(-probe_pairs, 0))
    spent.update(counts)  # not training compute


def probe_stats():
    """Implicit accuracy (fraction of h > 0) and mean h on the probe pairs, with the current weights."""
    if probe is None or probe[0] == 0:
        return ""
    counts = dict(spent)
    with amp():
        acc, h = probe[2]()
    spent.update(counts)
    return f" | probe_acc {acc:.4f} | probe_h {h:.4f}"


# -----------------------------------------------------------------------------
# the loop
if master and eval_seeds and step == 0 and not pretrain:
    evaluate("start")
if master and probe is not None and step == 0:
    log(f"probe {probe[0]} pairs of {probe_pairs} prompts (never trained on), base model{probe_stats()}")
bar = tqdm(total=steps, initial=step, disable=quiet, desc=method, mininterval=5)
bad_in_row = skipped = 0
saved = [step]  # the step of the checkpoint on disk (resume: the one loaded)
while step < steps:
    if fault("KILL_RANK", f"{rank}:{step}"):
        os._exit(9)
    t0 = time.time()
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    opt.zero_grad(set_to_none=True)
    # first every micro-step's rollouts, rewards and selection (no graph), then the count of what they train
    # on over all ranks and micro-steps, so that the loss is one mean over the whole optimizer step
    with amp():
        batches = [batch(step, micro) for micro in range(grad_accum)]
    units = torch.tensor([float(sum(c for c, _ in batches)), float(sum(c == 0 for c, _ in batches))])
    if ddp:
        torch.distributed.all_reduce(units)  # [pairs or items, rank-micro-steps with none], every rank, every step
    kept, idle_micro = int(units[0].item()), int(units[1].item())
    infos, total = [], 0.0
    for micro, (count, loss_fn) in enumerate(batches):
        with contextlib.ExitStack() as no_sync:  # DDP all-reduces only on the last micro-step
            if ddp and micro < grad_accum - 1:
                for net in nets:
                    no_sync.enter_context(net.no_sync())
            with amp():
                loss, info = loss_fn()
            if fault("NAN_STEPS", step + 1):
                loss = loss * float("nan")
            # DDP averages gradients over ranks: this weight makes the sum over ranks and micro-steps
            # sum_pairs loss_pair / (pairs in the whole step), whatever each rank kept
            scale = count * world / max(kept, 1)
            with timed("unet bwd"):
                scaler.scale(loss.float() * scale).backward()
        total += loss.item() * scale
        infos.append(info)
    del batches
    with timed("optim"):
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        # a non-finite loss or gradient (on any rank: grads are all-reduced, the flag is too) skips the
        # update; fp16's inf gradients are the GradScaler's business (it skips and lowers the scale)
        bad = torch.tensor(float(not math.isfinite(total) or (dtype != "fp16" and not gnorm.isfinite())))
        if ddp:
            torch.distributed.all_reduce(bad)
        bad, nothing = bad.item() > 0, kept == 0  # nothing: every prompt tied (or failed) on every rank
        bad_in_row, skipped = (bad_in_row + 1 if bad else 0), skipped + bad
        if bad or nothing:
            opt.zero_grad(set_to_none=True)
        if bad:
            scaler.update()
            if master:
                log(f"step {step + 1} skipped: non-finite loss or gradient ({bad_in_row} in a row, {skipped} in all)")
            if bad_in_row >= max_bad_steps:
                fail(f"{bad_in_row} steps in a row had a non-finite loss or gradient (max_bad_steps={max_bad_steps}); "
                     f"stopping without saving: {ckpt_path} holds the last good state")
        elif nothing:
            if master:
                log(f"step {step + 1}: nothing to train on (every prompt tied or failed), no update")
        else:
            scaler.step(opt)
            scaler.update()
            if ema_params is not None:
                with torch.no_grad():
                    for e, p in zip(ema_params, params):
                        e.lerp_(p.detach(), 1 - ema)
    step += 1
    bar.update(1)
    if step % log_interval == 0 or step == steps:
        # the loss, then each info column's mean over micro-steps and ranks, leaving out where it is undefined
        # (NaN: a rank with no pair has no implicit accuracy, one whose scores all failed no reward)
        stats = torch.tensor([[i[k] for k in sorted(infos[0])] for i in infos]).nanmean(0)
        sums = torch.tensor([total / world, spent["nfe"], spent["scored"]], dtype=torch.float64)
        if ddp:  # only logging scalars cross ranks
            torch.distributed.all_reduce(sums)  # the step's loss; UNet image-passes and reward calls so far
            if len(stats):  # (the same on every rank: the method's columns)
                every = [torch.zeros_like(stats) for _ in range(world)]
                torch.distributed.all_gather(every, stats)
                stats = torch.stack(every).nanmean(0)
        if master:
            cols = "".join(f" | {k} {v:.4f}" for k, v in zip(sorted(infos[0]), stats.tolist()))
            cols += f" | kept {kept} | idle {idle_micro}" + (probe_stats() if step % probe_interval == 0 or step == steps else "")
            log(f"step {step} | loss {sums[0].float():.6f}{cols} | gnorm {gnorm.item():.3f} | nfe {int(sums[1])} | "
                f"scored {int(sums[2])} | lr {lr_at(step - 1):.2e} | dt {(time.time() - t0) * 1000:.0f}ms" +
                (f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if device == "cuda" else ""))
    if master and (step % ckpt_interval == 0 or step == steps):
        checkpoint()
        if fault("CRASH_AFTER_STEP", step):
            os._exit(3)
    if master and profile:  # where this step's time went (the unet phases include autocast's casts)
        total = time.time() - t0
        timing["other"] = total - sum(timing.values())  # sampler bookkeeping, encodes, data, logging, ckpt
        log(f"profile {step} | total {total * 1000:.0f}ms | " + " | ".join(
            f"{k} {100 * v / total:.1f}%" for k, v in timing.items()))
    timing.clear()
    every = eval_interval or (max(1, steps // (eval_count + 1)) if eval_count else 0)
    if master and eval_seeds and ((every and step % every == 0) or step == steps):
        evaluate("end" if step == steps else "mid")
bar.close()
if master:
    export(save_to or os.path.join(out_dir, "model"))
    print(f"saved model to {save_to or os.path.join(out_dir, 'model')}")
if ddp:
    if fault("COUNT_SYNCS", 1):
        print(f"rank {rank}: {syncs[0]} gradient all-reduces")
    del nets, unet, opt  # teardown order that avoids gloo's abort at exit
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
