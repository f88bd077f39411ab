# The converged base model on web-like (alt-text) captions, in progress (docs/notes.md, 2026-12-01):
# under-specified pretraining captions (toyworld.ALT_TEXT) trained to a plateau of held-out gold.
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_alttext.py
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_alttext.py --init_from=resume
method = "pretrain"
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
out_dir = "out/pretrain_alttext"
