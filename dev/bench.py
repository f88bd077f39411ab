"""
Where the time goes, as ratios measured side by side in one run (docs/performance.md).

    python dev/bench.py                  # CPU, built-in toy model, a few minutes
    python dev/bench.py --device=cuda    # adds the fused Triton loss (kernels/weighted_mse.py) on a GPU

1. a training step split into UNet forward / backward, decode, reward, optimizer and the rest
   (train.py --profile), for sharpen_rlhf and sharpen_sft; goal: the rest + optimizer + decode <= 10 %
2. K trajectories in one batched UNet call per step vs a Python loop over K; goal >= 0.8 K
3. shared work: a prompt's n trajectories share one text encoding (repeat, not re-encode) and RLHF
   re-noises one generated sample for all n (instead of generating n)
4. reward throughput (images/s) of the toy rewards, and the MLLM grader against a loopback stub with
   50 ms per request, concurrency 1 vs 8
6. --parallel=fsdp's step time over DDP's, the same sharpen_rlhf run on `ranks` processes (torchrun), side by side
No test times anything: the correctness of each fast path is tested against the plain path in test_all.py.
"""
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # python dev/bench.py from anywhere

import torch  # noqa: E402

import models as M  # noqa: E402
import sample as S  # noqa: E402
import toyworld  # noqa: E402
from dev.stub_grader import StubGrader  # noqa: E402

# -----------------------------------------------------------------------------
device = "cpu"
K = 8                    # trajectories batched in part 2
repeats = 3              # timings are medians of this many runs
train_steps = 4          # profiled training steps (the first is left out: warm-up)
ranks = 2                # part 6: processes per run (on CUDA: one per GPU, at most the GPUs there are)
# -----------------------------------------------------------------------------


def median_time(fn, n=None):
    ts = []
    for _ in range(n or repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def step_split(method):
    """Mean share of each phase over the profiled steps after the first: {phase: percent}, ms per step."""
    with tempfile.TemporaryDirectory() as d:
        config = ["config/sharpen_sft.py"] if method == "sharpen_sft" else []  # its tuned lr and start_range
        subprocess.run([sys.executable, "train.py", *config, f"--method={method}", f"--steps={train_steps}", "--profile",
                        "--prompts_per_step=8", "--m_steps=3", "--eval_seeds=0", f"--device={device}", f"--out_dir={d}", f"--ckpt_interval={10**6}"],
                       check=True, capture_output=True, cwd=ROOT)
        rows = [dict((k, float(v)) for k, v in re.findall(r"\| ([\w ]+?) ([\d.]+)%", l))
                | {"ms": float(re.search(r"total (\d+)ms", l).group(1))}
                for l in open(f"{d}/log.txt") if l.startswith("profile")][1:]
    return {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in rows[0]}


def parallel_step_ms(parallel):
    """Median step time (ms) of the steps after the first of a sharpen_rlhf run on `ranks` processes."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                        "train.py", f"--parallel={parallel}", f"--steps={train_steps + 1}", f"--prompts_per_step={4 * ranks}",
                        "--eval_seeds=0", "--probe_pairs=0", f"--device={device}", f"--out_dir={d}",
                        f"--ckpt_interval={10**6}"], check=True, capture_output=True, cwd=ROOT)
        return statistics.median(float(re.search(r"\| dt (\d+)ms", l).group(1))
                                 for l in open(f"{d}/log.txt") if l.startswith("step ") and "| dt " in l)


def main():
    S.configure(globals(), sys.argv[1:])
    print(f"bench on {device}: {torch.cuda.get_device_name() if device == 'cuda' else f'{os.cpu_count()} CPU cores'}, "
          f"torch {torch.__version__}, medians of {repeats}\n")

    print("1. training step split (train.py --profile, built-in model, 8 prompts x 3 trajectories x 3 steps)")
    for method in ("sharpen_rlhf", "sharpen_sft"):
        sp = step_split(method)
        rest = sum(v for k, v in sp.items() if k not in ("unet fwd", "unet bwd", "reward", "ms"))
        print(f"   {method:13s} {sp['ms']:6.0f} ms/step | " + " | ".join(f"{k} {v:.1f}%" for k, v in sp.items() if k != "ms")
              + f" || outside UNet and reward: {rest:.1f}% ({'goal <= 10% met' if rest <= 10 else 'goal <= 10% NOT met'})")

    pipe = M.load_model(M.TOY_MODEL, device)
    torch.set_num_threads(os.cpu_count())
    ts = S.timesteps(pipe, 20)
    prompts = ["a red circle left of a blue square"] * K
    gens = [torch.Generator().manual_seed(i) for i in range(K)]
    x = S.randn((3, 32, 32), gens, pipe.device)
    cond = M.encode(pipe, prompts[:1]).repeat(K, 1, 1)
    with torch.no_grad():
        batched = median_time(lambda: S.rollout(pipe, x, ts[5:8], cond))
        looped = median_time(lambda: [S.rollout(pipe, x[i:i + 1], ts[5:8], cond[i:i + 1]) for i in range(K)])
    print(f"\n2. {K} trajectories x 3 DDIM steps: batched {batched * 1000:.0f} ms, loop {looped * 1000:.0f} ms -> "
          f"speed-up {looped / batched:.2f}x (goal >= {0.8 * K:.1f}x: {'met' if looped / batched >= 0.8 * K else 'NOT met'})")

    P, n = 8, 3
    ps = [toyworld.caption(toyworld.random_spec(random.Random(i))) for i in range(P)]
    shared = median_time(lambda: M.encode(pipe, ps).repeat_interleave(n, 0))
    again = median_time(lambda: M.encode(pipe, [p for p in ps for _ in range(n)]))
    g8 = [torch.Generator().manual_seed(i) for i in range(P * n)]
    with torch.no_grad():
        one = median_time(lambda: S.rollout(pipe, S.randn((3, 32, 32), g8[:P]), ts, M.encode(pipe, ps), record=False), 1)
        each = median_time(lambda: S.rollout(pipe, S.randn((3, 32, 32), g8), ts,
                                             M.encode(pipe, ps).repeat_interleave(n, 0), record=False), 1)
    print(f"\n3. {P} prompts x {n} trajectories: text encoding shared {shared * 1000:.1f} ms vs per trajectory "
          f"{again * 1000:.1f} ms ({again / shared:.1f}x)\n"
          f"   RLHF start samples (20 steps): one per prompt, re-noised for all {n}: {one * 1000:.0f} ms vs one per "
          f"trajectory {each * 1000:.0f} ms ({each / one:.1f}x)")

    import reward
    images = S.sample(pipe, ps * 8, list(range(P * 8)), num_steps=10)
    print(f"\n4. reward throughput on {len(images)} images of 32x32")
    for name in ("compositional", "toyclip"):
        fn = reward.make_reward(name)
        fn(images[:4], ps[:4])  # load
        t = median_time(lambda: fn(images, ps * 8))
        print(f"   {name:13s} {len(images) / t:8.0f} images/s")
    stub = StubGrader()
    try:
        rates = {}
        for c in (1, 8):
            g = reward.MLLMGrader(stub.url, model="stub", key_env="NO_KEY", concurrency=c, timeout=5)
            qs = [f"lat50 prompt {i}" for i in range(32)]  # distinct prompts: the cache never answers
            t = time.perf_counter()
            g(images[:32], qs)
            rates[c] = 32 / (time.perf_counter() - t)
            stub.calls.clear()
        print(f"   mllm stub (50 ms per request): concurrency 1 {rates[1]:.1f} images/s, 8 {rates[8]:.1f} images/s "
              f"({rates[8] / rates[1]:.1f}x)")
    finally:
        stub.server.shutdown()

    if device == "cuda":
        print("\n5. fused weighted-MSE loss (Triton) vs eager and torch.compile", flush=True)
        subprocess.run([sys.executable, "-m", "kernels.weighted_mse"], check=True, cwd=ROOT)  # its own benchmark
    else:
        print("\n5. the fused Triton loss needs a GPU: python dev/bench.py --device=cuda")

    n = min(ranks, torch.cuda.device_count()) if device == "cuda" else ranks
    if n >= 2:
        globals()["ranks"] = n
        ms = {p: parallel_step_ms(p) for p in ("ddp", "fsdp")}
        print(f"\n6. sharpen_rlhf on {n} ranks: ddp {ms['ddp']:.0f} ms/step, fsdp {ms['fsdp']:.0f} ms/step -> fsdp / ddp "
              f"{ms['fsdp'] / ms['ddp']:.2f}")
    else:
        print("\n6. fsdp vs ddp needs 2 ranks")


if __name__ == "__main__":
    main()
