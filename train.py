"""
Training: Diffusion-Sharpening (arXiv 2502.12146; Alg. 1 = sharpen_sft, Alg. 2 = sharpen_rlhf), the
baselines it competes with (sft, raft, diffusion_dpo, ddpo, diffusion_nft) and the pretraining of the toy models.
The defaults are the variables below; config files and --key=value override them, later ones win.

    python train.py                                               # sharpen_rlhf, built-in toy model, CPU
    python train.py config/sharpen_sft.py --lam=0.1                # the SFT variant
    python train.py --device=cuda --model=/path/to/diffusers/folder --lora_rank=16 --dtype=bf16   # README, real models
    torchrun --standalone --nproc_per_node=8 train.py --device=cuda   # 8 GPUs (on CPU: 2 processes, gloo)
    torchrun --standalone --nproc_per_node=8 train.py --device=cuda --parallel=fsdp --dtype=bf16   # sharded (fsdp.py)
    torchrun --standalone --nproc_per_node=2 train.py config/pretrain_alttext.py   # the built-in model
"""
import contextlib
import copy
import datetime
import fcntl
import gc
import math
import os
import re
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import baselines as B
import eval as E
import fsdp as F
import lora as L
import rollout as R
import models as M
import sample as S
import sharpen
import toyworld
from reward import make_reward

# -----------------------------------------------------------------------------
# run
method = "sharpen_rlhf"  # sharpen_rlhf | sharpen_sft | pretrain | baselines: sft | raft | diffusion_dpo | ddpo | diffusion_nft | continued
model = M.TOY_MODEL      # the diffusers folder training starts from
out_dir = ""             # ckpt.pt, log.txt, model/ ("" = out/<method>)
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
sft_target = "exact"     # exact (to the noised x0) | official (the first eps reused) | final (sharpen_sft: its own end)
sft_data = "render"      # sharpen_sft's pairs: render (exact captions) | alttext (pretraining scenes, their web captions)
sft_weights = "prompt"   # sharpen_sft's softmax: over each prompt's trajectories (Eq. 9) | step (all of a step's, lam > 0)
dpo_target = "outcome"   # sharpen_rlhf's targets: outcome (each trajectory's last x0 prediction: winner and loser aim apart) | start
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
timestep_fraction = 0.0  # ddpo, diffusion_nft: fraction of the sampler's steps a step trains (per sample; 0: m_steps)
ddpo_eta = 1.0           # ddpo: DDIM eta of its sampler (a flow model: its SDE's noise level, Flow-GRPO's 0.7)
ddpo_std = "prompt"      # ddpo: advantages over each prompt's std (ddpo-pytorch) | step (the round's, Flow-GRPO's)
ddpo_kl = 0.0            # ddpo: weight of each trained step's KL to the base model (Flow-GRPO's beta, 0.04)
nft_beta = 1.0           # diffusion_nft: implicit policies v+ = (1 - beta) v_old + beta v, v- = (1 + beta) v_old - beta v
nft_decay = 0.001        # diffusion_nft: old policy <- d old + (1 - d) theta each step, d = min(nft_decay * step, 0.5)
nft_kl = 1e-4            # diffusion_nft: weight of |v - v_ref|^2 against the base model (0: no reference passes)
raft_n = 4               # raft: samples per train prompt (the evaluation sampler); the best by the reward is trained on
raft_epochs = 2          # raft: passes over each sampled round's pool (each step at fresh t and noise)
raft_pool = 0            # raft: train prompts per round (a multiple of prompts_per_step; 0 = one step's)
raft_select = "best"     # raft: best (by the reward) | first (candidate 0: the no-selection control, the same pool)
replay = 0               # raft, sharpen_sft: pretraining scenes (alt-text captions) added to every step, the anchor
train_text_encoder = False  # sft, continued, raft: the text encoder trains too, in fp32 (SD1.x-style models, no LoRA)
# pretraining (toy world) and its continuation (method continued: the UNet alone, from `model`)
flow = False             # pretrain: a rectified-flow toy model (velocity target, Euler sampler) instead of DDIM v-pred
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
parallel = "ddp"         # ddp (each rank holds the model and its AdamW state) | fsdp (sharded over the ranks, fsdp.py)
                         # | hsdp (sharded inside a node, replicated across nodes)
cpu_offload = False      # fsdp: the sharded weights, gradients and AdamW state in CPU memory
ddp_timeout = 300        # seconds a rank waits for the others in a collective before it fails (a dead rank)
dry_run = False          # resolve the config, run every check, print the config line and stop (no model loads)
# -----------------------------------------------------------------------------
config = S.configure(globals(), sys.argv[1:])  # config files and --key=value, in order
out_dir = config["out_dir"] = out_dir or os.path.join("out", method)
METHODS = {  # name -> (prepare, loss): rollout.py's contract
    "sharpen_rlhf": (sharpen.prepare_sharpen_rlhf, sharpen.loss_sharpen_rlhf),
    "sharpen_sft": (sharpen.prepare_sharpen_sft, sharpen.loss_sharpen_sft),
    "pretrain": (B.prepare_scenes, B.loss_denoising), "continued": (B.prepare_scenes, B.loss_denoising),
    "sft": (B.prepare_scenes, B.loss_denoising), "raft": (B.prepare_raft, B.loss_denoising),
    "diffusion_dpo": (B.prepare_diffusion_dpo, B.loss_diffusion_dpo), "ddpo": (B.prepare_ddpo, B.loss_ddpo),
    "diffusion_nft": (B.prepare_diffusion_nft, B.loss_diffusion_nft)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fault injection for the tests, all of it (env TRAIN_<KIND>=a,b,..: a rank dies at "rank:step", the loss of these
# steps is NaN, the checkpoint write at these steps fails (full disk) or is killed halfway, the run crashes after
# these steps; TRAIN_COUNT_SYNCS=1 counts DDP's gradient all-reduces)
FAULTS = {k: os.environ.get("TRAIN_" + k, "").split(",") for k in
          ("KILL_RANK", "NAN_STEPS", "FAIL_CKPT_AT_STEP", "KILL_IN_CKPT_AT_STEP", "CRASH_AFTER_STEP", "COUNT_SYNCS")}


def fail(msg):
    raise SystemExit(f"error: {msg}")


def within(key, low, high=None, low_open=False):  # [low, high), (low, ...) if low_open; NaN is outside any
    v = globals()[key]
    ok = (v > low if low_open else v >= low) and (high is None or v < high)
    where = f"in [{low}, {high})" if high is not None else f"> {low}" if low_open else f">= {low}"
    return not ok, f"{key} must be {where}, got {v!r}"


pretrain = method == "pretrain"
torchrun = int(os.environ.get("RANK", -1)) != -1  # nanoGPT-style: torchrun sets RANK
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if torchrun else (0, 1)
fsdp = parallel in ("fsdp", "hsdp")
per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # hsdp's shard group: a node's ranks
ddp = torchrun or fsdp  # a process group (fsdp on one process: a group of one)
master = rank == 0
per_step = batch_size if pretrain else prompts_per_step  # a prompt's n trajectories stay on one rank
cfg = SimpleNamespace(**config)  # the run's config, as the modules read it
# every check of the config, (bad, one-line message), in order, before any work: the first that holds stops the run
CHECKS = [
    (method not in METHODS, f"unknown method {method!r} (known: {', '.join(METHODS)})"),
    *[(globals()[k] not in v, f"{k} must be {' or '.join(map(repr, v))}, got {globals()[k]!r}") for k, v in (
        ("init_from", ("scratch", "resume")), ("dtype", tuple(DTYPES)), ("dpo_target", ("start", "outcome")),
        ("sft_target", ("exact", "official", "final")), ("score_steps", ("all", "last")), ("sft_t", ("uniform", "sampler")),
        ("agg", sharpen.AGGREGATES), ("uncond_embed", ("auto", "zeros", "empty")), ("device", ("cpu", "cuda")),
        ("raft_select", ("best", "first")), ("sft_data", ("render", "alttext")), ("sft_weights", ("prompt", "step")),
        ("ddpo_std", ("prompt", "step")), ("parallel", ("ddp", "fsdp", "hsdp")))],
    (not eval_split or bool(set(eval_split.split(",")) - {"heldout", "train"}),
     f"eval_split must be 'heldout', 'train' or both comma-separated, got {eval_split!r}"),
    *[within(k, 1) for k in ("steps", "prompts_per_step", "batch_size", "grad_accum", "n_traj", "m_steps", "num_steps",
                             "dpo_pool", "ppo_epochs", "raft_epochs", "max_bad_steps", "log_interval", "probe_interval",
                             "ckpt_interval")],
    *[within(k, 0) for k in ("nfe_budget", "lam", "guidance", "eta", "resolution", "warmup", "weight_decay",
                             "eval_interval", "eval_count", "eval_seeds", "probe_pairs", "lora_rank", "lora_alpha",
                             "threads", "raft_pool", "replay")],
    *sharpen.config_errors(cfg), *B.config_errors(cfg, per_step, world),  # the options the methods own
    *[within(k, 2) for k in ("dpo_k", "raft_n")],  # a best and a worst, or a choice
    *[within(k, 0, low_open=True) for k in ("lr", "beta", "grad_clip", "ppo_clip", "ddpo_eta", "ddp_timeout", "nft_beta")],
    within("ema", 0, 1), within("caption_dropout", 0, 1), within("nft_decay", 0), within("nft_kl", 0), within("ddpo_kl", 0),
    (not 0 <= timestep_fraction <= 1, f"timestep_fraction must be in [0, 1], got {timestep_fraction}"),
    (per_step % max(world * grad_accum, 1) != 0, f"{'batch_size' if pretrain else 'prompts_per_step'}={per_step} is not "
                                           f"divisible by {world} ranks x grad_accum {grad_accum}"),
    (not m_steps <= num_steps, f"m_steps={m_steps} must be in 1..num_steps={num_steps}"),
    (R.parse_range(start_range) is None,
     f"start_range={start_range!r}: expected 'a:b' with 0 <= a <= b <= 1 (fractions of the schedule)"),
    (fsdp and (dtype == "fp16" or compile), f"--parallel=fsdp runs in fp32 or bf16 and without compile here, got "
     f"dtype={dtype!r} compile={compile}"),
    (parallel == "hsdp" and world % per_node, f"--parallel=hsdp needs the same ranks on every node: {world} ranks, "
     f"{per_node} on this node"),
    (cpu_offload and (not fsdp or device != "cuda"), "--cpu_offload moves the sharded state off the GPUs: it needs "
     f"--parallel=fsdp and --device=cuda, got parallel={parallel!r} device={device!r}"),
    (device == "cuda" and not torch.cuda.is_available(), "--device=cuda but no CUDA device is available"),
    (dtype == "fp16" and device != "cuda", "--dtype=fp16 needs --device=cuda (fp16 autocast + GradScaler); on CPU: bf16"),
    (flow and not pretrain, "--flow builds a fresh flow toy model to pretrain (--method=pretrain); to train a flow "
                            "model, pass its folder with --model"),
    (lora_rank and pretrain, f"lora_rank={lora_rank}: must be 0 for pretrain (LoRA adapts a trained UNet)"),
    (pretrain and resolution not in (0, toyworld.SIZE),
     f"resolution={resolution}: pretraining trains on {toyworld.SIZE}-pixel toy-world scenes (0 or {toyworld.SIZE})"),
    (bool(prompt_file) and (method in ("pretrain", "sft", "continued", "sharpen_sft") or replay),
     f"--prompt_file with method {method}{' and replay' if replay else ''}: it trains on dataset images, "
     "which only the toy world provides here; use sharpen_rlhf, ddpo or diffusion_dpo (they need prompts only)"),
]
for bad, msg in CHECKS:
    if bad:
        fail(msg)
file_prompts = S.read_prompts(prompt_file) if prompt_file else []  # then the files, folders, reward, out_dir it names
if not pretrain:
    M.check_model_folder(model, resolution)
family = "sd" if pretrain else M.folder_family(model)  # FLUX's guidance costs no second pass
if train_text_encoder and family != "sd":
    fail(f"train_text_encoder: {model!r} is a {family} model; the text encoder trains on SD1.x-style models (one CLIP)")
if nfe_budget > 0:  # diffusion_dpo's offline pool is paid from the same budget
    pool_cost = dpo_pool * dpo_k * num_steps * S.passes_per_call(guidance, family) if method == "diffusion_dpo" else 0
    steps = config["steps"] = cfg.steps = max(1, int((nfe_budget - pool_cost) // R.planned_nfe(cfg, family)))
try:  # a reward spec that names no reward or folder stops here, before any model loads
    reward_fn = None if method in ("pretrain", "sft", "continued") else make_reward(reward, device)
except ValueError as e:
    fail(e)
if master:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create out_dir {out_dir!r}: {e.strerror}")
    if not os.access(out_dir, os.W_OK):
        fail(f"out_dir {out_dir!r} is not writable")
ckpt_path = os.path.join(out_dir, "ckpt" if fsdp else "ckpt.pt")  # fsdp: a folder of sharded checkpoints (fsdp.py)
if init_from == "resume":  # the checkpoint's config, memory-mapped (cheap): a mismatch fails here
    other = os.path.join(out_dir, "ckpt.pt" if fsdp else "ckpt")
    if not F.committed(ckpt_path):
        fail(f"--init_from=resume but {ckpt_path} does not exist" + (
            f" ({other} does: resume it with --parallel={'ddp' if fsdp else 'fsdp'})" if os.path.exists(other) else ""))
    try:
        saved_config = F.read_meta(ckpt_path)["config"]
    except Exception as e:
        fail(f"cannot read {ckpt_path} ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})")
    changed = [k for k in ("method", "seed", "prompts_per_step", "n_traj", "m_steps", "batch_size", "lora_rank", "sft_data",
                           "sft_weights", "sft_target", "raft_pool", "raft_select", "train_text_encoder")
               if saved_config.get(k, config[k]) != config[k]]
    if changed:
        fail(f"{ckpt_path} is from another config: " + ", ".join(
            f"{k}={saved_config.get(k)!r} there, {config.get(k)!r} here" for k in changed))
if dry_run:
    print("config " + " ".join(f"{k}={v!r}" for k, v in config.items()))
    sys.exit(0)
if master:  # one run per out_dir: a second would resume the same checkpoint and both would write it (held until exit)
    lock = open(os.path.join(out_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"out_dir {out_dir!r} is in use by another training run (it holds {out_dir}/.lock); stop it or wait for it")

# -----------------------------------------------------------------------------
# processes
dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device == "cuda" else "cpu"
if ddp:
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo",
                                         timeout=datetime.timedelta(seconds=ddp_timeout),
                                         **({} if torchrun else dict(store=torch.distributed.HashStore(), rank=0, world_size=1)))
    if device == "cuda":
        torch.cuda.set_device(dev)
torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
P = per_step // (world * grad_accum)  # images (pretrain) or prompts per rank per micro-step
if master:
    print(R.batch_line(cfg, P, world))
    print(f"compute: {R.planned_nfe(cfg, family):.0f} UNet passes per step planned (grad x3) x {steps} steps = "
          f"{R.planned_nfe(cfg, family) * steps:.0f}" + (f" (nfe_budget {nfe_budget})" if nfe_budget else ""))

# -----------------------------------------------------------------------------
# model, optimizer, resume: pretraining trains UNet + text encoder from scratch (train_text_encoder: both from `model`);
# the others train the UNet (all of it in fp32, or LoRA adapters in fp32 on a base in `dtype`); frozen modules stay in
# `dtype`
amp_dtype = DTYPES[dtype]
pipe = toyworld.new_toy_model(seed, flow) if pretrain else M.load_model(model, dev, amp_dtype, uncond_embed, resolution)
pipe.embedded_guidance = guidance  # FLUX-dev: --guidance is its guidance input, in rollouts and training passes
pipe.compute_device = torch.device(dev) if cpu_offload else None  # (the offloaded shards live in CPU memory)
pipe.unet.to(dev).train()
params = L.add_lora(pipe.unet, lora_rank, lora_alpha, seed) if lora_rank else \
    list(pipe.unet.float().requires_grad_(True).parameters())
trained = [pipe.unet]  # the trained modules
if pretrain or train_text_encoder:
    trained.append(pipe.text_encoder.float().to(dev).train().requires_grad_(True))
    params += list(pipe.text_encoder.parameters())
if grad_ckpt:
    pipe.unet.enable_gradient_checkpointing()
ref_unet = None  # the frozen reference of the DPO losses and the KL terms: the base model (LoRA: adapters off)
if method in ("sharpen_rlhf", "diffusion_dpo") or {"diffusion_nft": nft_kl, "ddpo": ddpo_kl}.get(method, 0):
    ref_unet = L.Disabled(pipe.unet) if lora_rank else copy.deepcopy(pipe.unet).to(amp_dtype).eval().requires_grad_(False)
old_unet = copy.deepcopy(pipe.unet).requires_grad_(False) if method == "diffusion_nft" else None  # its sampler
held = trained + [old_unet] * (old_unet is not None)  # the modules whose state the checkpoint holds
templates, sharded = [None] * len(trained), []  # fsdp: rank 0's meta copies that export fills; the sharded modules
if fsdp:  # the trained modules, the reference (LoRA's is the trained one, adapters off), the old policy
    templates = [F.meta_copy(m) if master else None for m in trained]
    sharded = [m for m in (*trained, None if lora_rank else ref_unet, old_unet) if m is not None]
    device_mesh = F.mesh(device, world, per_node) if parallel == "hsdp" else None
    for m in sharded:
        F.shard(m, amp_dtype, cpu_offload, device_mesh)
    params = L.lora_parameters(pipe.unet) if lora_rank else [p for m in trained for p in m.parameters()]  # DTensors
opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
ema_params = [p.detach().clone() for p in params] if ema else None
step, spent, rounds = 0, dict(nfe=0, scored=0), {}  # what the run has spent; ddpo's and raft's sampled rounds
keep = (lambda k: ".lora_" in k) if lora_rank else (lambda k: True)  # a LoRA checkpoint holds the adapters only
if init_from == "resume":  # (fsdp: DCP reshards what any number of ranks wrote to this run's ranks)
    ck = F.load(ckpt_path, held, opt, ema_params, keep, dev)
    step, spent = ck["step"], ck["spent"] if master or not fsdp else dict(nfe=0, scored=0)  # fsdp: all ranks' on 0
    rounds = ck["rounds"][rank] if len(ck["rounds"]) == world else {}  # other ranks: a round is sampled again
    if master:
        print(f"resumed from {ckpt_path} at step {step}")
run = R.Run(cfg, pipe, ref=ref_unet, reward_fn=reward_fn, rank=rank, world=world, P=P, per_step=per_step,
            prompts=file_prompts, device=dev, amp_dtype=amp_dtype, master=master, spent=spent, rounds=rounds, old=old_unet,
            quiet=not master or not sys.stderr.isatty())  # no progress bar in a redirected log
run.count_passes(pipe.unet, None if lora_rank else ref_unet, old_unet)  # LoRA's reference runs through pipe.unet
nets = trained  # what the passes with grad go through: DDP wrappers of the trained modules (fsdp: themselves)
if ddp and not fsdp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    nets = [DDP(m) for m in trained]
syncs = [0]  # TRAIN_COUNT_SYNCS: the gradient all-reduces (fsdp: reduce-scatters) of this rank
if ddp and "1" in FAULTS["COUNT_SYNCS"]:
    F.count_reductions(syncs, None if fsdp else nets[0])
run.net = torch.compile(nets[0]) if compile else nets[0]
run.text_net = nets[1] if len(nets) > 1 else None
scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
prepare, loss_of = METHODS[method]
if master and method == "sharpen_sft" and (warning := sharpen.exact_target_warning(run)):
    print(warning)

def lr_at(it):  # linear warmup, then cosine decay to lr/10
    return lr * (it + 1) / warmup if it < warmup else \
        lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, steps - warmup))))

# -----------------------------------------------------------------------------
# export, evaluation, logging, checkpoints


def export(folder):
    """The trained (or EMA) weights as a diffusers folder (save_model writes it atomically). fsdp: every rank calls
    it (the full weights are gathered into rank 0's templates); None on the other ranks."""
    memo, ema_full = {id(run): run}, ema_params  # (the counting hooks are bound to run: not copied, then dropped)
    if fsdp:
        gathered = [F.gather(m, t) for m, t in zip(trained, templates)]
        ema_full = None if ema_params is None else [F.full(e) for e in ema_params]
        if not master:
            return None
        memo.update({id(m): g.to(dev) for m, g in zip(trained, gathered)})
    out = copy.deepcopy(pipe, memo)
    out.unet._forward_pre_hooks.clear(), out.unet._forward_hooks.clear()  # its passes are not training compute
    if ema_full is not None:  # the copy's parameters in the order of `params`
        copies = L.lora_parameters(out.unet) if lora_rank else \
            [p for m in (out.unet, out.text_encoder)[:len(trained)] for p in m.parameters()]
        for p, e in zip(copies, ema_full):
            p.data.copy_(e)
    adapters = L.diffusers_state_dict(out.unet, pipe.denoiser) if lora_rank else None  # a file for load_lora_weights
    if lora_rank:  # a plain diffusers UNet with the adapters folded in
        L.merge(out.unet)
    out.unet.eval(), out.text_encoder.eval()
    M.save_model(out, folder, lora=adapters)
    return out


def evaluate(tag):
    exported = export(os.path.join(out_dir, "model"))
    if exported is None:  # fsdp: a rank other than 0, which gathered
        return
    for split in eval_split.split(","):
        res = E.gold_eval(exported, split=split, seeds=eval_seeds, num_steps=num_steps, guidance=guidance)
        proxy = "" if reward == "compositional" or reward_fn is None else \
            f" | {split} {reward} {reward_fn(res['images'], res['prompts'])[0].nanmean().item():.4f}"
        log(f"eval {tag} | step {step} | nfe {run.spent['nfe'] * world} | {split} gold {res['overall']:.4f} | "
            f"n {res['n']} | " + " | ".join(f"{k} {v:.4f}" for k, v in res["per_skill"].items()) + proxy)


def log(line):
    tqdm.write(line)
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


def fault(stage, f=None):  # the tests' faults, on rank 0, the checkpoint written but not committed (f: its file)
    if str(step) in FAULTS["FAIL_CKPT_AT_STEP"]:
        raise OSError(28, "No space left on device")
    if str(step) in FAULTS["KILL_IN_CKPT_AT_STEP"]:
        if f is not None:
            f.truncate(f.tell() // 2)  # killed halfway through the file
        os._exit(9)


def checkpoint(rounds):
    """ckpt_path (rounds: every rank's, in rank order), written beside and committed in one rename: a crash leaves old
    or new. fsdp: every rank writes its shard into out_dir/ckpt/step_<N>/ (fsdp.save); else rank 0 one file."""
    finite = torch.tensor(float(all(F.local(p).isfinite().all() for p in params)))
    total = torch.tensor([run.spent["nfe"], run.spent["scored"]], dtype=torch.float64)
    if fsdp:  # each rank sees its shard, and spent its own passes: rank 0 resumes with the sum, any number of ranks
        torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(total)
    if not finite.item():  # never write a poisoned state
        fail(f"non-finite weights at step {step}; not writing {ckpt_path} (it holds the last good state)")
    meta = dict(step=step, config=config, rounds=rounds, spent=dict(nfe=int(total[0]), scored=int(total[1])))
    try:
        if fsdp:
            F.save(ckpt_path, step, held, opt, ema_params, meta, master, keep, fault)
        else:
            F.save_file(ckpt_path, held, opt, ema_params, meta, keep, fault)
    except OSError as e:
        fail(f"writing {ckpt_path} at step {step} failed ({e.strerror or e}); " + (f"the previous checkpoint (step "
             f"{saved}) is intact" if F.committed(ckpt_path) else "there is no earlier checkpoint"))
    if master and str(step) in FAULTS["CRASH_AFTER_STEP"]:
        os._exit(3)
    return step


if master:  # a fresh run starts the log; a resumed one keeps its lines up to the checkpoint's step (not those after)
    path = os.path.join(out_dir, "log.txt")
    lines = open(path).readlines() if init_from == "resume" and os.path.exists(path) else []
    logged = [re.search(r"\bstep (\d+)", line) for line in lines]  # None: a line of no step (config, probe)
    open(path, "w").writelines(line for line, m in zip(lines, logged) if m is None or int(m[1]) <= step)
    log("config " + " ".join(f"{k}={v!r}" for k, v in config.items()))  # this run's part of the log starts here
with F.full_weights(*sharded):  # (fsdp: rank 0's passes need every rank's shards, gathered)
    probe = sharpen.probe_pairs(run, probe_pairs) if method == "sharpen_rlhf" and master else None  # is it learned?

# -----------------------------------------------------------------------------
# the loop
if (master or fsdp) and eval_seeds and step == 0 and not pretrain:
    evaluate("start")
if method == "sharpen_rlhf" and probe_pairs and step == 0:
    with F.full_weights(*sharded):
        if master and probe is not None:
            log(f"probe {probe['count']} pairs of {probe_pairs} prompts (never trained on), base model"
                f"{sharpen.probe_line(run, probe)}")
bar = tqdm(total=steps, initial=step, disable=run.quiet, desc=method, mininterval=5)
eval_every = eval_interval or (max(1, steps // (eval_count + 1)) if eval_count else 0)
bad_in_row = skipped = 0
saved = step  # the step of the checkpoint on disk (resume: the one loaded)
try:
    while step < steps:
        if f"{rank}:{step}" in FAULTS["KILL_RANK"]:
            os._exit(9)
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        if method == "diffusion_nft":  # its sampling policy follows the trained one (on the sharded weights)
            B.nft_follow(run, step)
        with F.full_weights(*sharded):  # fsdp: every block gathered for the step's passes, any number (fsdp.py)
            # every micro-step's sampling, scoring, selection (no graph), then the count over ranks and micro-steps: one mean
            with run.amp():
                batches = [prepare(run, step, micro) for micro in range(grad_accum)]
            units = torch.tensor([sum(b["count"] for b in batches), sum(b["count"] == 0 for b in batches)], dtype=torch.float64)
            if ddp:  # [pairs, items or (sft_weights=step) weights; rank-micro-steps with none], every rank, every step
                torch.distributed.all_reduce(units)
            kept, idle_micro = units[0].item(), int(units[1].item())
            infos, step_loss = [], 0.0
            for micro, b in enumerate(batches):
                with contextlib.ExitStack() as no_sync:  # DDP all-reduces only on the last micro-step
                    for net in nets if ddp and micro < grad_accum - 1 else []:
                        no_sync.enter_context(F.no_sync(net) if fsdp else net.no_sync())
                    with run.amp():
                        loss, info = loss_of(run, b) if b["count"] else (run.idle_loss(), b["info"])
                    if str(step + 1) in FAULTS["NAN_STEPS"]:
                        loss = loss * float("nan")
                    # DDP averages over ranks: the sum over ranks and micro-steps is then sum loss_pair / (step's pairs)
                    scale = b["count"] * world / (kept or 1)
                    with run.timed("unet bwd"):
                        scaler.scale(loss.float() * scale).backward()
                step_loss += loss.item() * scale
                infos.append(info)
            del batches
        with run.timed("optim"):
            scaler.unscale_(opt)
            gnorm = F.full(torch.nn.utils.clip_grad_norm_(params, grad_clip))  # (fsdp: a DTensor)
            # a non-finite loss or gradient (on any rank: grads are all-reduced, the flag is too) skips the
            # update; fp16's inf gradients are the GradScaler's business (it skips and lowers the scale)
            bad = torch.tensor(float(not math.isfinite(step_loss) or (dtype != "fp16" and not gnorm.isfinite())))
            if ddp:
                torch.distributed.all_reduce(bad)
            bad, nothing = bad.item() > 0, kept == 0  # nothing: every prompt tied (or failed) on every rank
            bad_in_row, skipped = (bad_in_row + 1 if bad else 0), skipped + bad
            if bad:
                scaler.update()
                if master:
                    log(f"step {step + 1} skipped: non-finite loss or gradient ({bad_in_row} in a row, {skipped} in all)")
                if bad_in_row >= max_bad_steps:
                    fail(f"{bad_in_row} steps in a row had a non-finite loss or gradient (max_bad_steps="
                         f"{max_bad_steps}); stopping without saving: {ckpt_path} holds the last good state")
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
            sums = torch.tensor([step_loss / world, run.spent["nfe"], run.spent["scored"]], dtype=torch.float64)
            if ddp:  # only logging scalars cross ranks
                torch.distributed.all_reduce(sums)  # the step's loss; UNet image-passes and reward calls so far
                if len(stats):  # (the same on every rank: the method's columns)
                    ranks_stats = [torch.zeros_like(stats) for _ in range(world)]
                    torch.distributed.all_gather(ranks_stats, stats)
                    stats = torch.stack(ranks_stats).nanmean(0)
            probe_cols = ""
            if method == "sharpen_rlhf" and probe_pairs and (step % probe_interval == 0 or step == steps):
                with F.full_weights(*sharded):
                    probe_cols = sharpen.probe_line(run, probe) if master else ""
            if master:
                cols = "".join(f" | {k} {v:.4f}" for k, v in zip(sorted(infos[0]), stats.tolist()))
                cols += f" | kept {kept:g} | idle {idle_micro}" + probe_cols
                log(f"step {step} | loss {sums[0].float():.6f}{cols} | gnorm {gnorm.item():.3f} | nfe {int(sums[1])} | "
                    f"scored {int(sums[2])} | lr {lr_at(step - 1):.2e} | dt {(time.time() - t0) * 1000:.0f}ms" +
                    (f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if device == "cuda" else ""))
        if step % ckpt_interval == 0 or step == steps:
            rounds = run.all_rounds()  # every rank's: ddpo's and raft's sampled rounds are each rank's own
            saved = checkpoint(rounds) if master or fsdp else saved
        if master and profile:  # where this step's time went
            log(run.profile_line(step, time.time() - t0))
        run.timing.clear()
        if (master or fsdp) and eval_seeds and ((eval_every and step % eval_every == 0) or step == steps):
            evaluate("end" if step == steps else "mid")
finally:
    bar.close()  # before an error's line, so that it gets a line of its own

# -----------------------------------------------------------------------------
# teardown
if master or fsdp:
    if export(os.path.join(out_dir, "model")) is not None:
        print(f"saved model to {os.path.join(out_dir, 'model')}")
if ddp:
    if "1" in FAULTS["COUNT_SYNCS"]:
        print(f"rank {rank}: {syncs[0]} gradient all-reduces" +
              (f" ({len(F.fsdp_modules(*trained))} sharded blocks)" if fsdp else ""))
    del nets, run, opt  # teardown order that avoids gloo's abort at exit
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
