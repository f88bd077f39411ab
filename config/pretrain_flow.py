# The built-in flow toy model (in progress): the same networks, captions and recipe as
# config/pretrain_alttext.py, trained as a rectified flow (velocity target, Euler sampler, no shift).
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_flow.py
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_flow.py --init_from=resume
method = "pretrain"
flow = True
captions = "alttext"
steps = 12000
batch_size = 64
lr = 1e-3
warmup = 100
ema = 0.995
eval_seeds = 4
eval_split = "heldout,train"
eval_interval = 1000
log_interval = 10
ckpt_interval = 100
out_dir = "out/pretrain_flow"
