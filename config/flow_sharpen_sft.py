# Diffusion-Sharpening, SFT variant (Alg. 1), on the built-in flow toy model (assets/toy-flow-model): the
# settings of config/sharpen_sft.py (chosen for the diffusion toy model on train prompts), unchanged.
#   python train.py config/flow_sharpen_sft.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "sharpen_sft.py")).read())
model = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "assets", "toy-flow-model"))
out_dir = "out/flow_sharpen_sft"
