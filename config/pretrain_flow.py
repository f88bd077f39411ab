# The built-in flow toy model (in progress): config/pretrain_alttext.py's networks, captions and recipe, trained
# as a rectified flow (velocity target, Euler sampler, no shift).
#   torchrun --standalone --nproc_per_node=2 train.py config/pretrain_flow.py   [--init_from=resume]
import os
exec(open(os.path.join(os.path.dirname(__file__), "pretrain_alttext.py")).read())
flow = True
out_dir = "out/pretrain_flow"
