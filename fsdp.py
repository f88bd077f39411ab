"""
--parallel=fsdp: the trained denoiser (and its frozen copies: the DPO reference, diffusion_nft's old policy) sharded
over the ranks with FSDP2 (`fully_shard` per UNet down/mid/up block or transformer block, then the root); the fp32
master weights, gradients and AdamW's state live 1/world per rank. Sharded checkpoints through
torch.distributed.checkpoint (DCP), committed atomically and resumed on any number of ranks (without fsdp: rank
0's one file, save_file); export gathers the full state dict on rank 0.

How a step runs. How many passes a rank makes depends on its data (ties, failed scores, the start steps drawn,
raft's and ddpo's rounds, rank 0's probe and evaluation), and FSDP all-gathers a block in every forward by default:
ranks that made different numbers of passes would wait on each other forever. So every rank gathers every block
once per step (`full_weights`: one all-gather per block, the same on every rank) and keeps it gathered through the
step's passes, with grad or without (no reshard after forward or backward); the one backward each rank makes per
micro-step (train.py's contract) reduce-scatters each block's gradient once, as DDP's all-reduce would, and under
`no_sync` not at all. Passes then issue no collective, whatever their number (measured on 2 gloo ranks: 2 vs 1
forwards before a backward, 3 vs 0 backwards under no_sync, give the 1-process gradient exactly). Memory: a step
holds the full weights in the compute dtype (--dtype), as inference holds them; what sharding saves is the fp32
master weights, gradients and AdamW's state, 16 of the 18 bytes per trained parameter of mixed-precision training.
"""
import contextlib
import copy
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "layers")  # + mid_block


def blocks(model):
    """The units each rank holds 1/world of: every UNet down/mid/up block, every SD3/FLUX transformer block, every
    text-encoder layer."""
    out, names = [], []
    for name, mod in model.named_modules():
        if any(name.startswith(n + ".") for n in names):  # inside a block already (a UNet block's transformer blocks)
            continue
        last = name.rsplit(".", 1)[-1]
        if last == "mid_block" or (last in BLOCK_LISTS and isinstance(mod, torch.nn.ModuleList)):
            found = [(name, mod)] if last == "mid_block" else [(f"{name}.{i}", m) for i, m in enumerate(mod)]
            names += [n for n, _ in found]
            out += [m for _, m in found]
    return out


def mesh(device, world, per_node):
    """hsdp's 2-D device mesh: shard over a node's per_node ranks, replicate over the world // per_node nodes (a step
    gathers its weights inside a node, and only gradients cross nodes)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def shard(model, compute_dtype=torch.float32, cpu_offload=False, device_mesh=None):
    """fully_shard each block of model, then the root, in place (its parameters become DTensors: build the optimizer
    after this). compute_dtype other than fp32: the gathered weights and the passes in it, gradients reduced in
    fp32. cpu_offload: the sharded state (weights, gradients, AdamW's) in CPU memory, the optimizer step on the CPU.
    device_mesh: hsdp's (mesh()); None: shard over every rank."""
    kw = dict(reshard_after_forward=False, mesh=device_mesh)
    if compute_dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for b in blocks(model):
        fully_shard(b, **kw)
    fully_shard(model, **kw)
    for m in fsdp_modules(model):
        m.set_reshard_after_backward(False)  # the step's gathered weights stay gathered until full_weights ends
    return model


def fsdp_modules(*models):
    return [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(*models):
    """Every FSDP block of models gathered for the length of the block (a collective: every rank enters it, the same
    times), then freed. Inside, passes (with grad or not, any number) issue no collective; a backward reduce-scatters
    the gradients (unless no_sync). Models that are not sharded pass through."""
    mods = fsdp_modules(*models)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()


@contextlib.contextmanager
def no_sync(model, on=True):
    """Gradients kept local (accumulated, not reduce-scattered) by this block's backwards."""
    mods = fsdp_modules(model) if on else []
    for m in mods:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True, recurse=False)


def count_reductions(counter, ddp_net=None):
    """The tests' no_sync check: counter[0] += 1 for every gradient reduce-scatter of this rank (one per FSDP block
    per synced backward), or with ddp_net (a DDP wrapper) for every all-reduce of its gradient buckets."""
    if ddp_net is not None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted_allreduce(state, bucket):  # DDP's default all-reduce, counted
            counter[0] += 1
            return allreduce_hook(None, bucket)
        return ddp_net.register_comm_hook(None, counted_allreduce)
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as C
    call = C.DefaultReduceScatter.__call__

    def counted(self, *args, **kw):
        counter[0] += 1
        return call(self, *args, **kw)
    C.DefaultReduceScatter.__call__ = counted


def local(t):
    """A DTensor's local shard (a plain tensor: itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t):
    """A DTensor gathered on every rank (a collective); a plain tensor: itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def meta_copy(model):
    """A copy of model whose parameters are on the meta device (no memory; buffers copied): the template a full
    state dict is loaded into for export (load_state_dict(..., assign=True))."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather(model, template, keep=None):
    """The full weights of sharded model (a collective, every rank) loaded into a fresh copy of template on rank 0 (on
    the CPU); None on the other ranks. keep: the state-dict keys gathered (LoRA: its adapters; the template keeps
    its own for the rest)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if template is None:
        return None
    out = copy.deepcopy(template)
    out.load_state_dict(sd, strict=True, assign=True)
    return out


# -----------------------------------------------------------------------------
# sharded checkpoints: out_dir/ckpt/step_<N>/ (DCP's files, one per rank, and meta.pt: step, config, what the run
# spent, every rank's rounds) and out_dir/ckpt/latest, which names the committed one. A step's folder is written,
# then (after every rank wrote its shard) `latest` is replaced in one rename, then older folders are deleted: a kill
# at any moment leaves `latest` naming a complete checkpoint (or no checkpoint, before the first).

def latest(ckpt_dir):
    """The committed step folder of ckpt_dir, or None."""
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(ckpt_dir, name) if name else None


def _state(models, opt, ema, keep):
    holder = torch.nn.ModuleList(models)  # one module tree, so that names are unique ("0.conv_in.weight", ...)
    msd = {k: v for k, v in get_model_state_dict(holder).items() if keep(k)}
    state = dict(model=msd, optimizer=get_optimizer_state_dict(holder, opt))
    if ema is not None:
        state["ema"] = {str(i): e for i, e in enumerate(ema)}
    return holder, state


def save(ckpt_dir, step, models, opt, ema, meta, master, keep=lambda k: True, fault=None):
    """Every rank: its shard of models (their state-dict keys `keep`), opt and the EMA weights into
    ckpt_dir/step_<step>; rank 0 also meta (a dict) into meta.pt; then the commit. fault(stage) is the tests' fault
    injection ("written": after the shards, before the commit)."""
    folder = os.path.join(ckpt_dir, f"step_{step}")
    if master:
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one of an earlier, killed attempt
        os.makedirs(folder)
    dist.barrier()
    _, state = _state(models, opt, ema, keep)
    dcp.save(state, checkpoint_id=folder)
    if master:
        _write(os.path.join(folder, "meta.pt"), lambda f: torch.save(meta, f))
        if fault:
            fault("written")
    dist.barrier()  # every rank's shard and the meta are on disk
    if master:
        _write(os.path.join(ckpt_dir, "latest"), lambda f: f.write(f"step_{step}\n".encode()))
        for name in os.listdir(ckpt_dir):
            if name.startswith("step_") and name != f"step_{step}":
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    dist.barrier()


def _write(path, fn):  # fn(f) writes the file beside, then the rename: a kill leaves the old file or the new one
    try:
        with open(path + ".tmp", "wb") as f:
            fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise


def save_file(path, models, opt, ema, meta, keep=lambda k: True, fault=None):
    """--parallel=ddp (or one process): rank 0's models (their state-dict keys `keep`), opt, the EMA weights and meta's
    entries in one file. fault(stage, f): the tests' fault injection ("written": before the sync and the rename)."""
    ck = dict(models=[{k: v for k, v in m.state_dict().items() if keep(k)} for m in models],
              optimizer=opt.state_dict(), ema=ema, **meta)

    def write(f):
        torch.save(ck, f)
        if fault:
            fault("written", f)
    _write(path, write)


def committed(path):
    """Whether path holds a checkpoint: a folder of sharded ones with its `latest`, or one file."""
    return latest(path) is not None if os.path.isdir(path) else os.path.isfile(path)


def read_meta(ckpt_dir):
    """The committed checkpoint's meta dict (step, config, ...): cheap, read before any model loads (one file:
    memory-mapped, its tensors not read)."""
    if not os.path.isdir(ckpt_dir):
        return torch.load(ckpt_dir, map_location="cpu", weights_only=False, mmap=True)
    folder = latest(ckpt_dir)
    if folder is None:
        raise FileNotFoundError(os.path.join(ckpt_dir, "latest"))
    return torch.load(os.path.join(folder, "meta.pt"), map_location="cpu", weights_only=False)


def load(ckpt_dir, models, opt, ema, keep=lambda k: True, device="cpu"):
    """The committed checkpoint into models, opt and ema in place, whatever the number of ranks that wrote it (DCP
    reshards to this run's sharding) -> its meta dict. Every rank. One file (save_file's): every key `keep` loaded."""
    if not os.path.isdir(ckpt_dir):
        ck = torch.load(ckpt_dir, map_location=device, weights_only=False)
        for m, sd in zip(models, ck["models"]):
            bad = m.load_state_dict(sd, strict=False)
            if bad.unexpected_keys or any(keep(k) for k in bad.missing_keys):
                raise RuntimeError(f"{ckpt_dir} does not fit the model: {bad}")
        opt.load_state_dict(ck["optimizer"])
        for e, saved in zip(ema or [], ck["ema"] or []):
            e.copy_(saved)
        return {k: v for k, v in ck.items() if k not in ("models", "optimizer", "ema")}  # not a second copy of the state
    folder = latest(ckpt_dir)
    holder, state = _state(models, opt, ema, keep)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(holder, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(holder, opt, state["optimizer"])
    if ema is not None:
        for i, e in enumerate(ema):
            e.copy_(state["ema"][str(i)])
    return torch.load(os.path.join(folder, "meta.pt"), map_location="cpu", weights_only=False)
