"""
Fused per-row MSE and weighted MSE, the diffusion-training loss of Diffusion-Sharpening
(arXiv 2502.12146): each trajectory step's noise-prediction error, weighted by its path-integral weight.

For eps_pred, eps_target of shape (N, D) (any (N, ...) flattened at the boundary) and weights (N,):
    row_mse_i    = 1/D * sum_d (eps_pred_id - eps_target_id)^2           (N,) fp32
    weighted_mse = sum_i w_i * row_mse_i                                 0-dim fp32
    d eps_pred   = 2 * g_i * (eps_pred - eps_target) / D,  d eps_target = -d eps_pred
where g_i is the gradient reaching row_mse_i; weighted_mse is (w * row_mse).sum(), so autograd hands
the row backward g_i = w_i * grad_out and one autograd.Function serves both losses.

What is fused: eager torch materialises diff, diff^2 (fp32 copies for bf16 inputs) and, in backward,
several N*D temporaries. Here the forward reads pred and target once and writes N floats; the backward
reads pred and target once more and writes d pred (and d target, if needed) directly.
Bytes-moved napkin math (e = bytes per element, 4 for fp32, 2 for bf16):
    forward   reads 2*N*D*e                     SD1.5 N=64, D=16,384, fp32:  8.4 MB
    backward  reads 2*N*D*e, writes N*D*e       (+N*D*e with d target)      12.6 MB
so forward+backward is ~21 MB: ~6 us at H100 SXM's 3.35 TB/s, i.e. launch-latency bound at small N.
The forward runs one program per row, so SDXL's N=16 rows occupy 16 of an H100's 132 SMs; the
backward runs one program per (row, 1,024-value chunk). Not yet measured on a GPU: run the benchmark.
"""
import math
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON, _TRITON_ERROR = True, None
except ImportError as e:  # the package must import and work on CPU without triton
    HAS_TRITON, _TRITON_ERROR = False, e

# the interpreter is picked when @triton.jit runs, i.e. when this module is imported
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_FWD_MAX = 4096  # elements per loop step in the forward; a row of 16,384 takes 4 steps
BLOCK_BWD_MAX = 1024  # elements per backward program; SDXL N=16 x 65,536 -> 1,024 programs

# -----------------------------------------------------------------------------
# reference (pure torch): the test oracle and the CPU path

def _flatten(x):
    # (N, ...) -> (N, D) contiguous; prod of an empty shape is 1, so (N,) becomes (N, 1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).contiguous()

def row_mse_reference(eps_pred, eps_target):
    diff = _flatten(eps_pred).float() - _flatten(eps_target).float()  # (N, D) fp32
    return diff.pow(2).mean(dim=1)  # (N,)

def weighted_mse_reference(eps_pred, eps_target, weights):
    return (weights.float() * row_mse_reference(eps_pred, eps_target)).sum()

# -----------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:
    @triton.jit
    def _row_mse_fwd_kernel(
        pred_ptr,      # *T   (N, D) eps_pred, row-major
        target_ptr,    # *T   (N, D) eps_target, same layout as pred
        out_ptr,       # *f32 (N,) row_mse output
        stride_pred,   # elements between consecutive rows of pred (D when contiguous)
        stride_target, # elements between consecutive rows of target
        D,             # row length (elements per row)
        BLOCK: tl.constexpr,  # chunk size, a power of two
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: N*D can pass 2^31 for big batches
        pred_row = pred_ptr + row * stride_pred
        target_row = target_ptr + row * stride_target
        cols = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane partial sums, reduced once at the end
        for start in range(0, D, BLOCK):
            idx = start + cols
            mask = idx < D
            p = tl.load(pred_row + idx, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(target_row + idx, mask=mask, other=0.0).to(tl.float32)
            diff = p - t  # masked lanes are 0 - 0 and add nothing
            acc += diff * diff
        tl.store(out_ptr + row, tl.sum(acc, axis=0) / D)

    @triton.jit
    def _row_mse_bwd_kernel(
        pred_ptr,      # *T   (N, D) eps_pred saved from the forward
        target_ptr,    # *T   (N, D) eps_target saved from the forward
        g_ptr,         # *f32 (N,) gradient reaching row_mse (w_i * grad_out for weighted_mse)
        dpred_ptr,     # *T   (N, D) output: d eps_pred, contiguous
        dtarget_ptr,   # *T   (N, D) output: d eps_target, contiguous (unused if not WRITE_DTARGET)
        stride_pred,   # elements between consecutive rows of pred
        stride_target, # elements between consecutive rows of target
        stride_grad,   # elements between consecutive rows of dpred and dtarget
        D,             # row length
        BLOCK: tl.constexpr,          # elements per program
        WRITE_DTARGET: tl.constexpr,  # also write d target = -d pred (saves a torch negation pass)
    ):
        row = tl.program_id(0).to(tl.int64)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # this program's chunk of the row
        mask = idx < D
        p = tl.load(pred_ptr + row * stride_pred + idx, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + row * stride_target + idx, mask=mask, other=0.0).to(tl.float32)
        scale = 2.0 * tl.load(g_ptr + row) / D  # fp32 per-row scale
        dpred = scale * (p - t)
        tl.store(dpred_ptr + row * stride_grad + idx, dpred.to(dpred_ptr.dtype.element_ty), mask=mask)
        if WRITE_DTARGET:
            tl.store(dtarget_ptr + row * stride_grad + idx, (-dpred).to(dtarget_ptr.dtype.element_ty),
                     mask=mask)

# -----------------------------------------------------------------------------
# launchers

def _num_warps(block):
    return 8 if block >= 2048 else 4

def _row_mse_fwd(pred, target):
    N, D = pred.shape
    out = torch.empty(N, device=pred.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(D), BLOCK_FWD_MAX)
    _row_mse_fwd_kernel[(N,)](pred, target, out, pred.stride(0), target.stride(0), D,
                              BLOCK=block, num_warps=_num_warps(block))
    return out

def _row_mse_bwd(pred, target, g, write_dtarget):
    N, D = pred.shape
    dpred = torch.empty_like(pred)
    dtarget = torch.empty_like(target) if write_dtarget else dpred  # dummy pointer when unused
    block = min(triton.next_power_of_2(D), BLOCK_BWD_MAX)
    grid = (N, triton.cdiv(D, block))
    _row_mse_bwd_kernel[grid](pred, target, g, dpred, dtarget, pred.stride(0), target.stride(0),
                              dpred.stride(0), D, BLOCK=block, WRITE_DTARGET=write_dtarget,
                              num_warps=_num_warps(block))
    return dpred, (dtarget if write_dtarget else None)

class RowMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target):  # (N, D) contiguous, same dtype
        ctx.save_for_backward(pred, target)
        return _row_mse_fwd(pred, target)  # (N,) fp32

    @staticmethod
    def backward(ctx, grad_row):  # (N,) fp32
        pred, target = ctx.saved_tensors
        need_pred, need_target = ctx.needs_input_grad
        if not (need_pred or need_target):
            return None, None
        g = grad_row.float().contiguous()
        dpred, dtarget = _row_mse_bwd(pred, target, g, write_dtarget=need_target)
        return (dpred if need_pred else None), dtarget

# -----------------------------------------------------------------------------
# public functions

def _check(eps_pred, eps_target, weights=None):
    if eps_pred.shape != eps_target.shape:
        raise ValueError(f"eps_pred {tuple(eps_pred.shape)} and eps_target "
                         f"{tuple(eps_target.shape)} must have the same shape")
    if eps_pred.dim() == 0 or eps_pred.numel() == 0:
        raise ValueError(f"expected a non-empty (N, ...) tensor, got shape {tuple(eps_pred.shape)}")
    for name, x in (("eps_pred", eps_pred), ("eps_target", eps_target)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; supported: fp32, bf16, fp16")
    if eps_pred.dtype != eps_target.dtype:
        raise ValueError(f"eps_pred is {eps_pred.dtype} but eps_target is {eps_target.dtype}")
    if eps_pred.device != eps_target.device:
        raise ValueError(f"eps_pred on {eps_pred.device} but eps_target on {eps_target.device}")
    if weights is not None:
        if weights.shape != eps_pred.shape[:1]:
            raise ValueError(f"weights {tuple(weights.shape)} must be ({eps_pred.shape[0]},), "
                             "one per row of eps_pred")
        if not weights.is_floating_point():
            raise ValueError(f"weights must be floating point, got {weights.dtype}")

def _want_triton(x, use_triton):
    if use_triton is None:
        return HAS_TRITON and x.is_cuda
    if use_triton and not HAS_TRITON:
        raise RuntimeError(f"use_triton=True but triton failed to import: {_TRITON_ERROR}")
    if use_triton and not x.is_cuda and not _INTERPRET:
        raise RuntimeError("use_triton=True on CPU tensors needs TRITON_INTERPRET=1 in the "
                           "environment before `import kernels`")
    return bool(use_triton)

def row_mse(eps_pred, eps_target, use_triton=None):
    """Per-row mean squared error, (N, ...) x2 -> (N,) fp32, differentiable in both inputs."""
    _check(eps_pred, eps_target)
    if not _want_triton(eps_pred, use_triton):
        return row_mse_reference(eps_pred, eps_target)
    return RowMSE.apply(_flatten(eps_pred), _flatten(eps_target))

def weighted_mse(eps_pred, eps_target, weights, use_triton=None):
    """sum_i weights_i * row_mse_i -> 0-dim fp32, differentiable in all three inputs."""
    _check(eps_pred, eps_target, weights)
    return (weights.float() * row_mse(eps_pred, eps_target, use_triton=use_triton)).sum()

# -----------------------------------------------------------------------------
# benchmark: python -m kernels.weighted_mse  (needs a CUDA GPU)

PEAK_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H200": 4800, "A100 80GB": 2039}  # HBM, GB/s

def _peak_gbps(name):  # torch's names: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"
    name = name.replace("-", " ")
    if "H100" in name and "NVL" not in name:
        return PEAK_GBPS["H100 PCIe" if "PCIe" in name else "H100 SXM"]
    if "H200" in name:
        return PEAK_GBPS["H200"]
    if "A100" in name and "80GB" in name:
        return PEAK_GBPS["A100 80GB"]
    return None

def _bench():
    import triton.testing
    name = torch.cuda.get_device_name()
    peak = _peak_gbps(name)
    print(f"{name}: peak {peak} GB/s" if peak else f"{name}: peak unknown")
    compiled = torch.compile(weighted_mse_reference)
    for label, N, D in (("SD1.5", 64, 16384), ("SDXL", 16, 65536)):
        for dtype in (torch.float32, torch.bfloat16):
            pred = torch.randn(N, D, device="cuda", dtype=dtype, requires_grad=True)
            target = torch.randn(N, D, device="cuda", dtype=dtype)
            w = torch.rand(N, device="cuda")
            # forward reads 2ND, backward reads 2ND and writes ND (d pred only)
            nbytes = 5 * N * D * pred.element_size()
            fns = {"eager": weighted_mse_reference, "compile": compiled,  # eager first: the baseline
                   "triton": lambda p, t, ww: weighted_mse(p, t, ww, use_triton=True)}
            ms_eager = None
            for impl, fn in fns.items():
                step = lambda: fn(pred, target, w).backward()
                # do_bench runs step once untimed (compiles) and flushes L2 between timed runs:
                # 21 MB of SD1.5 traffic would otherwise sit in H100's 50 MB L2
                ms = triton.testing.do_bench(step, grad_to_none=[pred])
                ms_eager = ms if impl == "eager" else ms_eager
                gbps = nbytes / ms / 1e6
                frac = f"{gbps / peak:5.1%} of peak" if peak else "peak unknown"
                speedup = f"{ms_eager / ms:4.2f}x vs eager" if ms_eager else ""
                print(f"{label:5s} N={N:3d} D={D:6d} {str(dtype)[6:]:8s} {impl:8s} "
                      f"{ms * 1e3:8.1f} us {gbps:7.0f} GB/s {frac} {speedup}")

if __name__ == "__main__":
    if not (HAS_TRITON and torch.cuda.is_available()):
        print("kernels.weighted_mse benchmark needs a CUDA GPU with triton; nothing to do on CPU")
    else:
        _bench()
