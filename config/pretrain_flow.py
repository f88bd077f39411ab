# The built-in flow toy model (assets/toy-flow-model): config/pretrain_alttext.py's networks, captions and recipe,
# trained as a rectified flow (velocity target, Euler sampler, no shift), over half the steps (the diffusion toy
# model's held-out gold flattened from step 4,000 of 12,000; docs/results.md). 1.8 h measured on 2 CPU cores:
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_flow.py   [--init_from=resume]
# then copy out/pretrain_flow/model to assets/toy-flow-model.
import os
exec(open(os.path.join(os.path.dirname(__file__), "pretrain_alttext.py")).read())
flow = True
steps = 6000
out_dir = "out/pretrain_flow"
