# The recipe of the built-in toy model (assets/toy-model): pretrained to a plateau of held-out gold on web-like
# (alt-text) captions that under-specify their scenes (toyworld.ALT_TEXT; docs/results.md, the built-in model).
# 12,000 steps at 0.59 s/step on 2 CPU cores (about 2 h), resumable; held-out and train gold every 1,000 steps:
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_alttext.py   [--init_from=resume]
# then copy out/pretrain_alttext/model to assets/toy-model (same seed, same ranks: the same weights).
method = "pretrain"
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
out_dir = "out/pretrain_alttext"
