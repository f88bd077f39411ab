#!/bin/bash
# The first GPU checks in two short runs, each step under its own timeout, every log in $OUT (default out/gpu_check).
#   bash dev/gpu_check.sh        (under 6 min) the machine and versions, the fused Triton loss's tests compiled, the
#                                benchmark with its GPU part, 40 s of the default toy run (its step times), full-size random-init SD1.5
#                                smoke runs of sharpen_rlhf, full and LoRA, bf16 (the dt and mem log columns)
#   bash dev/gpu_check.sh more   (under 6 min) the same smoke run with --compile, then the whole suite
# A machine with torch, triton and transformers but no diffusers needs this repo's pins as wheels in .whl/:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
#       -d .whl diffusers==0.42.1 transformers==5.23.0 importlib_metadata
set -u
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
step() {  # step <seconds> <log name> <command...>: the command's output in $OUT/<log>, its time and exit status at the end
    local limit=$1 log=$OUT/$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "== rc $? in $((SECONDS - t0)) s: $*" | tee -a "$log"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } > "$OUT/env.txt" 2>&1
step 30 env.txt python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'triton', triton.__version__,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
S="--device=cuda --model=/tmp/gc/sd15 --dtype=bf16 --steps=4 --prompts_per_step=2 --reward=toyclip --eval_seeds=0"
S="$S --method=sharpen_rlhf --score_steps=last --log_interval=1 --ckpt_interval=1000 --probe_pairs=0"
[ -d /tmp/gc/sd15 ] || step 40 sd15.txt python3 dev/sdconfigs.py --kind=sd15 --out=/tmp/gc/sd15
if [ "${1:-}" = more ]; then
    step 100 sd15.txt python3 train.py $S --compile --out_dir=/tmp/gc/rlhf_compile
    step 200 tests_all.txt python3 test_all.py --jobs=8
else
    step 60 tests_cuda.txt python3 test_all.py --jobs=2 fused
    step 90 bench.txt python3 dev/bench.py --device=cuda
    step 40 toy.txt python3 train.py --device=cuda --out_dir=/tmp/gc/toy --eval_seeds=0
    step 45 sd15.txt python3 train.py $S --out_dir=/tmp/gc/rlhf
    step 45 sd15.txt python3 train.py $S --lora_rank=16 --out_dir=/tmp/gc/rlhf_lora
fi
grep -h "^== rc" "$OUT"/*.txt
