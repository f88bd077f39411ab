# Diffusion-Sharpening, RLHF variant (Alg. 2), on the built-in flow toy model (assets/toy-flow-model: a rectified
# flow, Euler sampler; config/pretrain_flow.py). train.py's settings otherwise, as for the diffusion toy model.
#   python train.py config/flow_sharpen_rlhf.py
import os
model = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "assets", "toy-flow-model"))
out_dir = "out/flow_sharpen_rlhf"
