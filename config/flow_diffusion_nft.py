# DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) on the built-in flow toy model, its native setting: the old
# policy's ODE samples, 10 sampler steps in training (eval.py samples 20), every one trained per sample; beta 1,
# decay_type 1 (nft_decay 0.001, up to 0.5), KL weight 1e-4, as its official config; its lr is
# config/diffusion_nft.py's (chosen on the DDIM model's train prompts), as the flow model's other configs take the
# DDIM model's settings.
#   python train.py config/flow_diffusion_nft.py [--nfe_budget=184320]
import os
model = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "assets", "toy-flow-model"))
method = "diffusion_nft"
out_dir = "out/flow_diffusion_nft"
n_traj = 8               # images per prompt (official: 24)
prompts_per_step = 16
num_steps = 10
timestep_fraction = 0.99
lr = 1e-4                # config/diffusion_nft.py's
