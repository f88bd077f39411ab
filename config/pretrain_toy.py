# The recipe of the built-in toy model (assets/toy-model): 28 min on 2 CPU cores.
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_toy.py
# then copy out/pretrain_toy/model to assets/toy-model (same seed, same ranks: the same weights).
method = "pretrain"
steps = 1500
batch_size = 64
lr = 1e-3
warmup = 100
ema = 0.995
eval_seeds = 0
log_interval = 10
ckpt_interval = 250
out_dir = "out/pretrain_toy"
