"""
LoRA (Hu et al. 2021, arXiv 2106.09685) for the UNet's attention projections, in under 100 lines instead of
a peft dependency: W x + (alpha / r) * B A x with A (r, in) random, B (out, r) zero, so a fresh adapter
is the identity; only A and B train. The frozen base keeps its (inference) dtype, A and B are fp32.

    add_lora(unet, rank=16, alpha=16)   # -> the adapters' parameters, in a fixed order
    with disabled(unet): ...            # the base model: the RLHF reference, no second UNet in memory
    merge(unet)                         # fold B A into W in place (export: a plain diffusers UNet)
"""
import contextlib
import math

import torch
import torch.nn as nn

TARGETS = ("to_q", "to_k", "to_v", "to_out.0",  # attention projections, as the diffusers LoRA scripts
           "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # (SD3's joint attention: the text stream)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha, generator=None):
        super().__init__()
        self.base, self.scale, self.enabled = base.requires_grad_(False), alpha / rank, True
        A = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # nn.Linear's own init
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x.to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()).to(y.dtype) * self.scale

    def merged(self):
        w = self.base.weight.float() + self.scale * self.lora_B.detach() @ self.lora_A.detach()
        lin = nn.Linear(self.base.in_features, self.base.out_features, self.base.bias is not None,
                        device=w.device, dtype=self.base.weight.dtype)
        lin.weight.data.copy_(w)
        if self.base.bias is not None:
            lin.bias.data.copy_(self.base.bias)
        return lin


def _replace(model, fn, kind):
    for name, mod in list(model.named_modules()):
        if isinstance(mod, kind) and (kind is LoRALinear or name.endswith(TARGETS)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fn(mod))


def add_lora(model, rank, alpha=None, seed=0):
    """Wrap every attention projection of `model` in a LoRALinear (A drawn from `seed`, on the CPU
    for any device); freeze the rest. -> the adapter parameters."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    _replace(model, lambda m: LoRALinear(m, rank, alpha or rank, g), nn.Linear)
    params = lora_parameters(model)
    if not params:
        raise ValueError(f"no {'/'.join(TARGETS)} linear layers in {type(model).__name__}: nothing to adapt")
    return params


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def merge(model):
    """Replace each LoRALinear by a plain nn.Linear with the adapter folded in (in place)."""
    _replace(model, lambda m: m.merged(), LoRALinear)
    return model


def diffusers_state_dict(model, prefix="unet"):
    """The adapters as diffusers' LoRA training scripts save them (pytorch_lora_weights.safetensors, which
    pipe.load_lora_weights reads), fp32: for a UNet (SD, SDXL scripts) '<prefix>.<module>.lora.down.weight' = A
    and '.lora.up.weight' = (alpha / r) B; for a transformer (SD3 script) '.lora_A.weight' and '.lora_B.weight'.
    The scale is folded into B, so the file needs no alpha: loaded at scale 1 it is this model."""
    names = ("lora.down", "lora.up") if prefix == "unet" else ("lora_A", "lora_B")
    return {f"{prefix}.{name}.{k}.weight": w.detach().float().cpu().clone() for name, m in model.named_modules()
            if isinstance(m, LoRALinear) for k, w in zip(names, (m.lora_A, m.lora_B * m.scale))}


@contextlib.contextmanager
def disabled(model):
    """The base model inside the block: every adapter of `model` off."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


class Disabled(nn.Module):
    """A callable view of `model` with its adapters off (the frozen reference of DPO-style losses).
    Holds the model outside the module tree, so its parameters are not counted twice."""
    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model

    def forward(self, *args, **kwargs):
        with disabled(self.model):
            return self.model(*args, **kwargs)
